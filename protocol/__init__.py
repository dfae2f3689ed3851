"""The wire schema between pipeline stages and clients: message kinds, codec, protocol version.

Defined once here (see STYLE.md: one module, one decoder per socket), it arrives with the
pipeline issue.
"""
