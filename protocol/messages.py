"""Every message that crosses a socket, defined once: the wire schema of the pipeline.

Each message is a frozen dataclass with a unique `KIND` tag. Fields are plain values (int, float,
str, bool, list[int], dict) or numpy arrays; arrays travel as their own raw frames (see
`protocol.codec`). New fields are only ever appended at the end, with defaults; the handshake
carries `PROTOCOL_VERSION`, and a peer speaking another version is refused. `check(limits)` is
each message's range check: the decoder calls it on every message it accepts, so a stage never
sees an out-of-range token id, layer, length or size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

PROTOCOL_VERSION = 1
ROLES = ("client", "launcher", "predictor", "prefetch", "compute")


class ProtocolError(ValueError):
    """A frame or message that is not in the schema, or out of range; names the problem."""


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts. The model-derived bounds come from the handshake."""

    max_frames: int = 8
    max_frame_bytes: int = 256 << 20
    # a prompt (with its system prompt) of at most max_prompt_chars characters always fits in
    # the header: 4 bytes a character at most in UTF-8, and 64 KiB for the other fields
    max_prompt_chars: int = 1 << 18
    max_header_bytes: int = (1 << 20) + (1 << 16)
    max_tokens: int = 32768
    vocab_size: int = 1 << 20
    n_layers: int = 1024
    d_model: int = 1 << 16
    n_neurons: int = 1 << 20
    row_bytes: int = 1 << 20
    n_rows: int = 1 << 26  # rows of the pipeline's shared memory


# A request's conversation and stop strings: bounded so that, with the prompt characters'
# bound, any accepted request fits the header limit (their keys and framing stay within 64 KiB).
MAX_MESSAGES = 1024
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # alternatives a token may carry (OpenAI's top_logprobs bound)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ProtocolError(message)


class Message:
    KIND: ClassVar[str]
    ARRAYS: ClassVar[dict[str, tuple[tuple[str, ...], int]]] = {}  # field -> (dtypes, ndim)

    def check(self, limits: Limits) -> None:  # noqa: B027 (most messages need no range check)
        """Ranges beyond the types (the codec already checked types and array dtypes)."""


# --------------------------------------------------------------------------- control


@dataclass(frozen=True)
class Hello(Message):
    """First message on every connection; the peer answers Welcome or Error."""

    KIND: ClassVar[str] = "hello"
    protocol: int
    role: str
    name: str = ""

    def check(self, limits: Limits) -> None:
        _need(self.role in ROLES, f"hello.role must be one of {ROLES}, got {self.role!r}")


@dataclass(frozen=True)
class Welcome(Message):
    KIND: ClassVar[str] = "welcome"
    protocol: int
    model: str
    vocab_size: int
    n_layers: int
    max_context: int


@dataclass(frozen=True)
class Heartbeat(Message):
    KIND: ClassVar[str] = "heartbeat"
    stage: str
    seq: int
    sent_at: float


@dataclass(frozen=True)
class Ready(Message):
    """A stage -> the launcher: loaded and serving (the READY handshake)."""

    KIND: ClassVar[str] = "ready"
    stage: str
    pid: int
    generation: int = 0  # how many times the launcher has started this stage before


@dataclass(frozen=True)
class Dead(Message):
    """A stage that cannot go on says so once, then exits."""

    KIND: ClassVar[str] = "dead"
    stage: str
    reason: str


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class Generate(Message):
    """Start a request: exactly one of `prompt` (text), `prompt_ids` (token ids) and `messages`
    (a conversation: {"role", "content"} each, rendered with the model's chat template).
    Sampling as `streamer.generate.SamplingParams`; the reply ends before the first of `stop`
    (strings) it would contain."""

    KIND: ClassVar[str] = "generate"
    request_id: str
    prompt: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    chat: bool = False
    system: str = ""
    ignore_eos: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int = -1  # -1: none; n >= 0: each token's log-probability and the n likeliest

    def check(self, limits: Limits) -> None:
        _need(0 < len(self.request_id) <= 128, "generate.request_id must be 1 to 128 characters")
        _need(
            (bool(self.prompt), bool(self.prompt_ids), bool(self.messages)).count(True) == 1,
            "generate needs exactly one of prompt, prompt_ids and messages",
        )
        _need(len(self.messages) <= MAX_MESSAGES, f"generate.messages: at most {MAX_MESSAGES}")
        _need(
            all(set(m) <= {"role", "content", "name"} for m in self.messages),
            "generate.messages: each takes role, content and name only",
        )
        _need(
            len(self.stop) <= MAX_STOP and all(0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
            f"generate.stop: at most {MAX_STOP} strings of 1 to {MAX_STOP_CHARS} characters",
        )
        text = len(self.prompt) + len(self.system) + sum(len(s) for s in self.stop)
        text += sum(len(v) for m in self.messages for v in m.values())
        _need(
            text <= limits.max_prompt_chars,
            f"generate.prompt is longer than {limits.max_prompt_chars} characters",
        )
        _need(
            len(self.prompt_ids) <= limits.max_tokens,
            f"generate.prompt_ids has more than {limits.max_tokens} tokens",
        )
        _need(
            all(0 <= t < limits.vocab_size for t in self.prompt_ids),
            f"generate.prompt_ids must lie in [0, {limits.vocab_size})",
        )
        _need(
            1 <= self.max_tokens <= limits.max_tokens,
            f"generate.max_tokens must be in [1, {limits.max_tokens}], got {self.max_tokens}",
        )
        _need(
            0 <= self.temperature <= 100,
            f"generate.temperature must be in [0, 100], got {self.temperature}",
        )
        _need(0 < self.top_p <= 1, f"generate.top_p must be in (0, 1], got {self.top_p}")
        _need(0 <= self.seed < 2**63, "generate.seed must be in [0, 2**63)")
        _need(0 <= self.top_k < 2**31, f"generate.top_k must be >= 0, got {self.top_k}")
        _need(
            -1 <= self.logprobs <= MAX_LOGPROBS,
            f"generate.logprobs must be in [-1, {MAX_LOGPROBS}], got {self.logprobs}",
        )
        _need(0 <= self.min_p < 1, f"generate.min_p must be in [0, 1), got {self.min_p}")
        _need(
            0 < self.repetition_penalty <= 100,
            f"generate.repetition_penalty must be in (0, 100], got {self.repetition_penalty}",
        )


@dataclass(frozen=True)
class Cancel(Message):
    KIND: ClassVar[str] = "cancel"
    request_id: str


@dataclass(frozen=True)
class Token(Message):
    """One generated token; `text` is what it adds to the decoded text so far. With the
    request's `logprobs` >= 0: the token's log-probability under the model, and the
    `logprobs` likeliest tokens' (token id, as text -> log-probability)."""

    KIND: ClassVar[str] = "token"
    request_id: str
    index: int
    token_id: int
    text: str = ""
    logprob: float = 0.0
    top_logprobs: dict[str, float] = field(default_factory=dict)

    def check(self, limits: Limits) -> None:
        _need(0 <= self.token_id < limits.vocab_size, "token.token_id out of range")
        _need(0 <= self.index < limits.max_tokens, "token.index out of range")
        _need(len(self.top_logprobs) <= MAX_LOGPROBS, "token.top_logprobs: too many")


@dataclass(frozen=True)
class Done(Message):
    KIND: ClassVar[str] = "done"
    request_id: str
    token_ids: list[int]
    text: str
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Error(Message):
    """A refused message or a failed request; `request_id` is "" when none applies."""

    KIND: ClassVar[str] = "error"
    request_id: str
    code: str
    message: str


# --------------------------------------------------------------------------- pipeline stages


def _check_layer(kind: str, layer: int, limits: Limits) -> None:
    _need(0 <= layer < limits.n_layers, f"{kind}.layer must be in [0, {limits.n_layers})")


def _check_values(kind: str, name: str, values: np.ndarray, bound: int, most: int) -> None:
    """At most `most` entries, each in [0, bound)."""
    _need(len(values) <= most, f"{kind}.{name} has more than {most} entries")
    if len(values):
        _need(
            int(values.min()) >= 0 and int(values.max()) < bound,
            f"{kind}.{name} must lie in [0, {bound})",
        )


def _check_ids(kind: str, name: str, ids: np.ndarray, limits: Limits) -> None:
    _check_values(kind, name, ids, limits.n_neurons, limits.n_neurons)


def _check_rows(msg: Any, limits: Limits) -> None:
    """Fetch and RowsReady: a layer, neuron ids paired with rows, and the window's moves."""
    _check_layer(msg.KIND, msg.layer, limits)
    _need(msg.neurons.shape == msg.rows.shape, f"{msg.KIND}.neurons and .rows differ in length")
    _check_ids(msg.KIND, "neurons", msg.neurons, limits)
    _check_values(msg.KIND, "rows", msg.rows, limits.n_rows, limits.n_neurons)
    _need(0 <= msg.cached <= limits.n_neurons, f"{msg.KIND}.cached out of range")
    _need(msg.moves.shape[1:] == (2,), f"{msg.KIND}.moves must have shape [k, 2]")
    _check_values(msg.KIND, "moves", msg.moves.reshape(-1), limits.n_neurons, 2 * limits.n_neurons)
    _need(len(msg.take) <= msg.cached, f"{msg.KIND}.take has more rows than the window holds")
    _check_values(msg.KIND, "take", msg.take, msg.cached, limits.n_neurons)
    _check_ids(msg.KIND, "extra", msg.extra, limits)


def _check_data(kind: str, data: np.ndarray, rows: int, limits: Limits) -> None:
    """Bundle rows sent as a frame (stages without shared memory): none, or one per row."""
    if data.size:
        _need(data.shape[0] == rows, f"{kind}.data must have one row per neuron ({rows})")
        _need(data.shape[1] <= limits.row_bytes, f"{kind}.data rows exceed {limits.row_bytes} B")


def _no_moves() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


def _no_take() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _no_data() -> np.ndarray:
    return np.zeros((0, 0), dtype=np.uint8)


@dataclass(frozen=True)
class Forward(Message):
    """Front end -> compute: run these tokens (a prompt, or one decoded token) of a sequence.
    `reset` starts the sequence: a new KV cache of `max_len` tokens and empty windows."""

    KIND: ClassVar[str] = "forward"
    ARRAYS: ClassVar[dict[str, tuple[tuple[str, ...], int]]] = {"tokens": (("int32", "int64"), 1)}
    request_id: str
    step: int
    tokens: np.ndarray
    reset: bool = False
    max_len: int = 0

    def check(self, limits: Limits) -> None:
        _need(0 < len(self.request_id) <= 128, "forward.request_id must be 1 to 128 characters")
        _need(len(self.tokens) > 0, "forward.tokens is empty")
        _check_values(self.KIND, "tokens", self.tokens, limits.vocab_size, limits.max_tokens)
        _need(0 <= self.max_len <= limits.max_tokens, "forward.max_len out of range")


@dataclass(frozen=True)
class Logits(Message):
    """Compute -> front end: the last position's logits of a Forward, and its telemetry."""

    KIND: ClassVar[str] = "logits"
    ARRAYS: ClassVar[dict[str, tuple[tuple[str, ...], int]]] = {"logits": (("float32",), 1)}
    request_id: str
    step: int
    logits: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def check(self, limits: Limits) -> None:
        _need(len(self.logits) <= limits.vocab_size, "logits.logits longer than the vocabulary")


@dataclass(frozen=True)
class Reset(Message):
    """Compute -> predictor: a new sequence; empty windows, messages of others are stale."""

    KIND: ClassVar[str] = "reset"
    request_id: str


@dataclass(frozen=True)
class Fill(Message):
    """Compute -> predictor after a prompt's layer: the true active sets of its last tokens
    (concatenated; `sizes` their lengths, oldest first), to fill that layer's window with."""

    KIND: ClassVar[str] = "fill"
    ARRAYS: ClassVar[dict[str, tuple[tuple[str, ...], int]]] = {
        "neurons": (("int32", "int64"), 1),
        "sizes": (("int32", "int64"), 1),
    }
    request_id: str
    layer: int
    neurons: np.ndarray
    sizes: np.ndarray

    def check(self, limits: Limits) -> None:
        _check_layer(self.KIND, self.layer, limits)
        _check_values(self.KIND, "sizes", self.sizes, limits.n_neurons + 1, 64)
        _need(int(self.sizes.sum()) == len(self.neurons), "fill.sizes must add up to len(neurons)")
        _check_values(self.KIND, "neurons", self.neurons, limits.n_neurons, 64 * limits.n_neurons)


@dataclass(frozen=True)
class LoadLayer(Message):
    """Compute -> prefetch during a prompt: read a layer's whole FFN into staging slot `slot`."""

    KIND: ClassVar[str] = "load_layer"
    request_id: str
    layer: int
    slot: int

    def check(self, limits: Limits) -> None:
        _check_layer(self.KIND, self.layer, limits)
        _need(self.slot in (0, 1), "load_layer.slot must be 0 or 1")


@dataclass(frozen=True)
class LayerReady(Message):
    """Prefetch -> compute: a LoadLayer is done."""

    KIND: ClassVar[str] = "layer_ready"
    ARRAYS: ClassVar[dict[str, tuple[tuple[str, ...], int]]] = {"data": (("uint8",), 2)}
    request_id: str
    layer: int
    slot: int
    bytes_read: int = 0
    reads: int = 0
    io_ms: float = 0.0
    data: np.ndarray = field(default_factory=_no_data)  # the layer's rows, without shared memory

    def check(self, limits: Limits) -> None:
        _check_layer(self.KIND, self.layer, limits)
        _need(self.slot in (0, 1), "layer_ready.slot must be 0 or 1")
        _check_data(self.KIND, self.data, len(self.data), limits)
        _need(len(self.data) <= limits.n_neurons, "layer_ready.data has more rows than neurons")


@dataclass(frozen=True)
class FFNInput(Message):
    """Compute -> predictor: a layer's FFN input as soon as it exists. x: [T, d]."""

    KIND: ClassVar[str] = "ffn_input"
    ARRAYS: ClassVar[dict[str, tuple[tuple[str, ...], int]]] = {"x": (("float16", "float32"), 2)}
    request_id: str
    step: int
    layer: int
    x: np.ndarray

    def check(self, limits: Limits) -> None:
        _check_layer(self.KIND, self.layer, limits)
        _need(self.x.shape[1] <= limits.d_model, "ffn_input.x is wider than d_model")


@dataclass(frozen=True)
class Fetch(Message):
    """Predictor -> prefetch: read these neurons' bundles into these cache rows."""

    KIND: ClassVar[str] = "fetch"
    ARRAYS: ClassVar[dict[str, tuple[tuple[str, ...], int]]] = {
        "neurons": (("int32", "int64"), 1),
        "rows": (("int32", "int64"), 1),
        "moves": (("int32", "int64"), 2),
        "take": (("int32", "int64"), 1),
        "extra": (("int32", "int64"), 1),
    }
    request_id: str
    step: int
    layer: int
    neurons: np.ndarray
    rows: np.ndarray
    lookahead: bool = False
    cached: int = 0  # the layer window's row count after this step
    stats: dict[str, Any] = field(default_factory=dict)  # the predictor's, passed on
    # [k, 2]: (to, from) rows of the layer's window moved this step, for a compute that does
    # not share the predictor's memory (the books' swap-deletes, composed)
    moves: np.ndarray = field(default_factory=_no_moves)
    # the window rows (after this step) of the token's neurons the window holds, in neuron
    # order: what compute multiplies, beside the overflow
    take: np.ndarray = field(default_factory=_no_take)
    # neurons among `neurons` read only because they lie between two the token needs (read
    # gaps): kept in the window, not multiplied (compute skips them in the overflow)
    extra: np.ndarray = field(default_factory=_no_take)

    def check(self, limits: Limits) -> None:
        _check_rows(self, limits)


@dataclass(frozen=True)
class RowsReady(Message):
    """Prefetch -> compute: the rows of a Fetch are in shared memory (or in `data`)."""

    KIND: ClassVar[str] = "rows_ready"
    ARRAYS: ClassVar[dict[str, tuple[tuple[str, ...], int]]] = {
        "neurons": (("int32", "int64"), 1),
        "rows": (("int32", "int64"), 1),
        "moves": (("int32", "int64"), 2),
        "take": (("int32", "int64"), 1),
        "extra": (("int32", "int64"), 1),
        "data": (("uint8",), 2),
    }
    request_id: str
    step: int
    layer: int
    neurons: np.ndarray
    rows: np.ndarray
    bytes_read: int = 0
    reads: int = 0
    io_ms: float = 0.0
    cached: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # the predictor's and prefetch's
    moves: np.ndarray = field(default_factory=_no_moves)  # the fetch's, passed on
    data: np.ndarray = field(default_factory=_no_data)  # [len(neurons), row bytes], or none
    take: np.ndarray = field(default_factory=_no_take)  # the fetch's, passed on
    extra: np.ndarray = field(default_factory=_no_take)  # the fetch's, passed on

    def check(self, limits: Limits) -> None:
        _check_rows(self, limits)
        _check_data(self.KIND, self.data, len(self.neurons), limits)


MESSAGES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Hello,
        Welcome,
        Heartbeat,
        Ready,
        Dead,
        Generate,
        Cancel,
        Token,
        Done,
        Error,
        FFNInput,
        Fetch,
        RowsReady,
        Forward,
        Logits,
        Reset,
        Fill,
        LoadLayer,
        LayerReady,
    )
}


def fields_of(cls: type[Message]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))  # type: ignore[arg-type]
