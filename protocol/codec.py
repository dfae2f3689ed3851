"""Messages to ZeroMQ frames and back: `encode(msg) -> frames`, `decode(frames) -> msg`.

Frame layout: `[kind][msgpack header][raw array buffers...]`. The header is a map with two keys:
`"f"`, the plain fields by name, and `"a"`, each array field as `[dtype, shape, frame index]`;
an array's bytes are its own frame (sent with `copy=False`: no copy through msgpack). `decode` is
strict: an unknown kind, a kind the socket does not take, a missing or unknown field, a wrong type,
an array whose bytes do not match its dtype and shape, an oversize frame, or a value out of range
(`Message.check`) raises `ProtocolError` naming the problem. It never raises anything else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import numpy as np

from protocol.messages import MESSAGES, Limits, Message, ProtocolError, fields_of

Frame = Any  # bytes, memoryview, or a zmq.Frame (anything with the buffer protocol)
MAX_DIM = 1 << 40  # an array dimension (one dimension 0 would let any other pass the size check)


def encode(msg: Message) -> list[Any]:
    """frames for `socket.send_multipart(frames, copy=False)`."""
    plain: dict[str, Any] = {}
    arrays: dict[str, list[Any]] = {}
    buffers: list[memoryview] = []
    for f in fields_of(type(msg)):
        value = getattr(msg, f.name)
        if f.name in msg.ARRAYS:
            arr = np.ascontiguousarray(value)
            arrays[f.name] = [arr.dtype.name, list(arr.shape), 2 + len(buffers)]
            buffers.append(memoryview(arr).cast("B") if arr.size else memoryview(b""))
        else:
            plain[f.name] = value
    header = msgpack.packb({"f": plain, "a": arrays}, use_bin_type=True)
    return [msg.KIND.encode(), header, *buffers]


def _bytes(frame: Frame) -> memoryview:
    try:
        return memoryview(getattr(frame, "buffer", frame)).cast("B")
    except TypeError:
        raise ProtocolError(f"frame of type {type(frame).__name__} is not a buffer") from None


def _check_type(kind: str, name: str, annotation: str, value: Any) -> Any:
    """The value if it has the field's type (ints are taken for floats), else ProtocolError."""
    where = f"{kind}.{name}"
    if annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64
    elif annotation == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(float(value)):
            raise ProtocolError(f"{where} must be a finite number, got {value}")
        value = float(value) if ok else value
    elif annotation == "str":
        ok = isinstance(value, str)
    elif annotation == "bool":
        ok = isinstance(value, bool)
    elif annotation == "list[int]":
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    elif annotation == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif annotation == "list[dict[str, str]]":
        ok = isinstance(value, list) and all(
            isinstance(m, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
            for m in value
        )
    elif annotation.startswith("dict["):
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    else:  # a schema bug, not a peer's
        raise TypeError(f"{where}: no wire type for annotation {annotation!r}")
    if not ok:
        raise ProtocolError(f"{where} must be {annotation}, got {type(value).__name__}")
    return value


def decode(
    frames: Sequence[Frame], limits: Limits | None = None, accept: Iterable[str] | None = None
) -> Message:
    """The message in `frames`, checked against the schema, `limits` and the kinds in `accept`."""
    limits = limits or Limits()
    if not 2 <= len(frames) <= limits.max_frames:
        raise ProtocolError(f"a message has 2 to {limits.max_frames} frames, got {len(frames)}")
    views = [_bytes(f) for f in frames]
    for i, v in enumerate(views):
        if len(v) > limits.max_frame_bytes:
            raise ProtocolError(
                f"frame {i} has {len(v)} bytes, more than the limit of {limits.max_frame_bytes}"
            )
    try:
        kind = bytes(views[0]).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("the kind frame is not ASCII") from None
    cls = MESSAGES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind[:40]!r}")
    if accept is not None and kind not in set(accept):
        raise ProtocolError(f"this socket does not take {kind!r} messages")
    if len(views[1]) > limits.max_header_bytes:
        raise ProtocolError(
            f"{kind} header has {len(views[1])} bytes, more than {limits.max_header_bytes}"
        )
    header = _unpack_header(views[1], kind)
    if (
        not isinstance(header, dict)
        or set(header) != {"f", "a"}
        or not all(isinstance(header[k], dict) for k in "fa")
    ):
        raise ProtocolError(f"{kind} header must be a map with the keys 'f' and 'a'")
    plain, arrays = header["f"], header["a"]
    schema = {f.name: f for f in fields_of(cls)}
    unknown = (set(plain) | set(arrays)) - set(schema)
    if unknown:
        raise ProtocolError(f"{kind} has no field(s) {sorted(map(str, unknown))[:5]}")
    not_arrays = set(arrays) - set(cls.ARRAYS)
    if not_arrays:
        raise ProtocolError(f"{kind}: {sorted(not_arrays)[:5]} are not array fields")
    values: dict[str, Any] = {}
    used_frames: set[int] = set()
    for name, f in schema.items():
        if name in cls.ARRAYS and name in arrays:
            values[name] = _array(kind, name, arrays[name], cls.ARRAYS[name], views, used_frames)
        elif name in cls.ARRAYS:
            if f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{kind}.{name} is missing")
        elif name in plain:
            values[name] = _check_type(kind, name, str(f.type), plain[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{kind}.{name} is missing")
    if used_frames != set(range(2, len(views))):
        raise ProtocolError(
            f"{kind} has {len(views) - 2 - len(used_frames)} frame(s) no field refers to"
        )
    msg = cls(**values)
    try:
        msg.check(limits)
    except ProtocolError:
        raise
    except (ValueError, TypeError, IndexError) as e:  # a check tripping on odd values
        raise ProtocolError(f"{kind}: {e}") from None
    return msg


def _array(
    kind: str,
    name: str,
    spec: Any,
    allowed: tuple[tuple[str, ...], int],
    views: list[memoryview],
    used: set[int],
) -> np.ndarray:
    where = f"{kind}.{name}"
    dtypes, ndim = allowed
    if not (
        isinstance(spec, list)
        and len(spec) == 3
        and isinstance(spec[0], str)
        and isinstance(spec[1], list)
        and isinstance(spec[2], int)
        and not isinstance(spec[2], bool)
    ):
        raise ProtocolError(f"{where} must be described as [dtype, shape, frame]")
    dtype, shape, index = spec
    if dtype not in dtypes:
        raise ProtocolError(f"{where} must have dtype {' or '.join(dtypes)}, got {dtype[:20]!r}")
    if len(shape) != ndim or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape
    ):
        raise ProtocolError(f"{where} must have {ndim} dimension(s), each in [0, {MAX_DIM}]")
    if not 2 <= index < len(views) or index in used:
        raise ProtocolError(f"{where} refers to frame {index}, which is not an unused array frame")
    used.add(index)
    itemsize = np.dtype(dtype).itemsize
    count = math.prod(shape)
    if count * itemsize != len(views[index]):
        raise ProtocolError(
            f"{where}: shape {shape} of {dtype} needs {count * itemsize} bytes, "
            f"the frame has {len(views[index])}"
        )
    return np.frombuffer(views[index], dtype=dtype).reshape(shape)


def _unpack_header(view: memoryview, kind: str) -> Any:
    """The header, unpacked with msgpack's own limits (no string, list or map longer than the
    header itself could hold; the caller has already bounded the header's size)."""
    n = len(view)
    try:
        return msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"{kind} header is not valid msgpack ({type(e).__name__})") from None


def request_id_of(frames: Sequence[Frame], limits: Limits | None = None) -> str:
    """Best effort, for error replies to a message `decode` refused: its request_id, or "".
    A header over the limit is not unpacked (it has no id to give)."""
    limits = limits or Limits()
    try:
        view = _bytes(frames[1])
        if len(view) > limits.max_header_bytes:
            return ""
        header = _unpack_header(view, "")
        request_id = header["f"]["request_id"]
        return request_id if isinstance(request_id, str) and len(request_id) <= 128 else ""
    except Exception:  # anything malformed: there is no id to give
        return ""
