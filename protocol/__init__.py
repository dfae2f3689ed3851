"""The wire schema between pipeline stages and clients: message kinds, codec, protocol version.

`protocol.messages` defines every message once (frozen dataclasses, one tag each);
`protocol.codec` turns them into ZeroMQ frames and back, strictly. README.md in this folder
documents the frame layout and every message for writers of other clients.
"""

from protocol.codec import decode, encode
from protocol.messages import MESSAGES, PROTOCOL_VERSION, Limits, Message, ProtocolError

__all__ = ["MESSAGES", "PROTOCOL_VERSION", "Limits", "Message", "ProtocolError", "decode", "encode"]
