"""The wire schema and codec: round trips of every message, over real ZeroMQ sockets too, and
strict rejection of everything else (hypothesis-generated frames never get past ProtocolError)."""

from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import decode, encode, request_id_of
from protocol.messages import (
    MESSAGES,
    PROTOCOL_VERSION,
    Cancel,
    Generate,
    Hello,
    Limits,
    ProtocolError,
    Token,
)
from tests.helpers import EXAMPLES, FETCH_TAKE, LIMITS, ids


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            if not (x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def test_every_kind_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(MESSAGES.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.KIND)
def test_round_trip(msg):
    frames = encode(msg)
    assert frames[0] == msg.KIND.encode()
    assert len(frames) == 2 + len(msg.ARRAYS)
    assert same(decode(frames, LIMITS), msg)
    # Arrays ride as their own frames, not copied into the header.
    for name in msg.ARRAYS:
        assert len(frames[1]) < getattr(msg, name).nbytes or getattr(msg, name).nbytes < 64


def test_round_trip_over_real_zeromq_sockets_zero_copy():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://codec-test")
        b.connect("inproc://codec-test")
        for msg in EXAMPLES:
            a.send_multipart(encode(msg), copy=False)
            got = decode(b.recv_multipart(copy=False), LIMITS)
            assert same(got, msg)
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def tamper(msg, **changes) -> list:
    """msg's frames with header fields replaced (None removes one)."""
    frames = encode(msg)
    header = msgpack.unpackb(frames[1])
    for key, value in changes.items():
        section, name = key.split("__")
        if value is None:
            header[section].pop(name)
        else:
            header[section][name] = value
    return [frames[0], msgpack.packb(header), *frames[2:]]


@pytest.mark.parametrize(
    "frames,match",
    [
        ([b"generate"], "2 to 8 frames"),
        ([b"nonsense", msgpack.packb({"f": {}, "a": {}})], "unknown message kind"),
        ([b"cancel", b"\xc1"], "not valid msgpack"),
        ([b"cancel", msgpack.packb([1, 2])], "map with the keys"),
        (tamper(Cancel("r"), f__request_id=None), "cancel.request_id is missing"),
        (tamper(Cancel("r"), f__request_id=5), "cancel.request_id must be str"),
        (tamper(Cancel("r"), f__color="red"), "no field"),
        (tamper(Token("r", 0, 5), f__token_id=True), "token_id must be int"),
        (tamper(Token("r", 0, 5), f__token_id=10**6), "token_id out of range"),
        (tamper(Generate("r", prompt="x"), f__prompt_ids=[1]), "exactly one of prompt"),
        (tamper(Generate("r", prompt="x"), f__max_tokens=0), "max_tokens must be in"),
        (tamper(Generate("r", prompt="x"), f__top_p=2), "top_p must be in"),
        (tamper(Generate("r", prompt_ids=[1]), f__prompt_ids=[1, 10**9]), "prompt_ids must lie"),
        (tamper(EXAMPLES[10], a__x=["float64", [2, 576], 2]), "dtype float16 or float32"),
        (tamper(EXAMPLES[10], a__x=["float16", [2, 577], 2]), "needs 2308 bytes"),
        (tamper(EXAMPLES[10], a__x=["float16", [1152], 2]), r"2 dimension\(s\), each in \[0, "),
        (tamper(EXAMPLES[10], a__x=["float16", [2, 576], 5]), "refers to frame 5"),
        (tamper(EXAMPLES[10], f__layer=30), "layer must be in"),
        (tamper(EXAMPLES[11], a__rows=["int32", [3], 3]), "needs 12 bytes"),
        (encode(EXAMPLES[3]) + [b"extra"], "no field refers to"),
        (tamper(EXAMPLES[13], a__moves=["int64", [1, 4], 4]), "moves must have shape"),
        (tamper(EXAMPLES[13], a__data=["uint8", [2, 8192], 5]), "one row per neuron"),
        (tamper(EXAMPLES[11], a__neurons=None), "fetch.neurons is missing"),
        (tamper(FETCH_TAKE, f__cached=2), "take has more rows than the window holds"),
        (tamper(FETCH_TAKE, f__cached=5), r"take must lie in \[0, 5\)"),
    ],
)
def test_malformed_messages_are_named(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frames, LIMITS)


def test_array_fields_appended_with_defaults_may_be_left_out():
    """A peer from before `moves` and `data` (fields appended with defaults) still decodes."""
    frames = encode(EXAMPLES[12])
    header = msgpack.unpackb(frames[1])
    kept = {k: v for k, v in header["a"].items() if k in ("neurons", "rows")}
    msg = decode([frames[0], msgpack.packb({"f": header["f"], "a": kept}), *frames[2:4]], LIMITS)
    assert msg.moves.shape == (0, 2) and msg.data.size == 0
    assert np.array_equal(msg.neurons, ids)


def test_limits_and_accepted_kinds():
    with pytest.raises(ProtocolError, match="more than the limit"):
        decode(encode(EXAMPLES[13]), Limits(max_frame_bytes=1000))
    with pytest.raises(ProtocolError, match="does not take 'cancel'"):
        decode(encode(Cancel("r")), LIMITS, accept={"generate"})
    with pytest.raises(ProtocolError, match="hello.role"):
        decode(encode(Hello(PROTOCOL_VERSION, "intruder")), LIMITS)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def packb(value) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.binary(max_size=64), max_size=10))
def test_random_frames_only_ever_raise_protocol_error(frames):
    with contextlib.suppress(ProtocolError):
        decode(frames, LIMITS)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(MESSAGES)),
    plain=st.dictionaries(
        st.sampled_from(
            [
                "request_id",
                "prompt",
                "prompt_ids",
                "max_tokens",
                "layer",
                "step",
                "token_id",
                "index",
                "x",
                "role",
                "protocol",
                "summary",
                "text",
                "top_p",
                "junk",
            ]
        ),
        msgpack_values,
        max_size=8,
    ),
    arrays=st.dictionaries(
        st.sampled_from(["x", "neurons", "rows", "data", "junk"]), msgpack_values, max_size=3
    ),
    extra=st.lists(st.binary(max_size=40), max_size=3),
)
def test_schema_shaped_garbage_only_ever_raises_protocol_error(kind, plain, arrays, extra):
    frames = [kind.encode(), packb({"f": plain, "a": arrays}), *extra]
    try:
        msg = decode(frames, LIMITS)
    except ProtocolError:
        return
    # Whatever got through is a well-formed message: it encodes and decodes to itself.
    assert same(decode(encode(msg), LIMITS), msg)


# --------------------------------------------------------------------------- hostile input (#15)

# every array field of every kind, with the dtypes and dimensions it takes
ARRAY_FIELDS = [(kind, name) for kind, cls in sorted(MESSAGES.items()) for name in cls.ARRAYS]


def test_a_huge_dimension_beside_a_zero_one_is_a_protocol_error():
    frames = [
        b"ffn_input",
        msgpack.packb(
            {
                "f": {"request_id": "r", "step": 0, "layer": 0},
                "a": {"x": ["float32", [2**63, 0], 2]},
            }
        ),
        b"",
    ]
    with pytest.raises(ProtocolError, match="dimension"):
        decode(frames, LIMITS)


DIMS = st.sampled_from([0, 1, 2**40 + 1, 2**63, 2**64 - 1]) | st.integers(0, 4096)


@st.composite
def hostile_array(draw):
    """An array field's description: mostly its own dtypes and dimension count (so that the
    decoder's later checks are reached), with dimensions from tiny to 2**64 - 1."""
    kind, name = draw(st.sampled_from(ARRAY_FIELDS))
    dtypes, ndim = MESSAGES[kind].ARRAYS[name]
    dtype = draw(st.sampled_from(dtypes) | st.sampled_from(["float64", "V8", "O", "<U4"]))
    shape = draw(
        st.lists(DIMS, min_size=ndim, max_size=ndim)
        | st.lists(DIMS | st.integers(-3, 8), max_size=4)
    )
    size = draw(st.just(0) | st.sampled_from([1, 4, 8, 2304, 4096]))
    return (kind, name), dtype, shape, size


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile=hostile_array())
def test_adversarial_arrays_only_ever_raise_protocol_error(hostile):
    field, dtype, shape, size = hostile
    kind, name = field
    frames = encode(next(e for e in EXAMPLES if kind == e.KIND and name in e.ARRAYS))
    header = msgpack.unpackb(frames[1])
    others = {n: spec for n, spec in header["a"].items() if n != name}
    header["a"] = {name: [dtype, shape, 2]}
    hostile = [frames[0], None, b"\0" * size]
    for n, (dt, shp, index) in others.items():  # the other arrays, valid, after it
        header["a"][n] = [dt, shp, len(hostile)]
        hostile.append(frames[index])
    hostile[1] = msgpack.packb(header)
    with contextlib.suppress(ProtocolError):
        decode(hostile, LIMITS)


def test_an_array_entry_for_a_plain_field_is_refused():
    header = {"f": {"request_id": "r1", "prompt": "hi"}, "a": {"max_tokens": ["int64", [1], 2]}}
    with pytest.raises(ProtocolError, match="not array fields"):
        decode([b"generate", msgpack.packb(header), np.zeros(1, np.int64).tobytes()], LIMITS)
    del header["a"]["max_tokens"]
    header["a"]["prompt"] = ["uint8", [0], 2]  # a reference to no frame at all
    with pytest.raises(ProtocolError, match="not array fields"):
        decode([b"generate", msgpack.packb(header)], LIMITS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_temperature_that_is_not_finite_is_named(value):
    frames = tamper(Generate("r1", prompt="hi"), f__temperature=value)
    with pytest.raises(ProtocolError, match="temperature must be a finite number, got"):
        decode(frames, LIMITS)


def test_the_longest_prompt_fits_the_header_limit():
    """Any prompt the prompt limit takes gets through the header limit, even in 4-byte
    characters; one character more is refused by the prompt limit, by name."""
    limits = Limits()
    emoji = "\U0001f600"
    msg = Generate("r" * 128, prompt=emoji * limits.max_prompt_chars, max_tokens=2)
    assert decode(encode(msg), limits).prompt == msg.prompt
    with pytest.raises(ProtocolError, match="generate.prompt is longer than"):
        decode(encode(dataclasses.replace(msg, prompt=msg.prompt + "a")), limits)


def test_an_oversize_header_is_not_unpacked_for_its_request_id():
    limits = Limits()
    header = msgpack.packb(
        {"f": {"request_id": "r7", "prompt": "a" * limits.max_header_bytes}, "a": {}}
    )
    assert request_id_of([b"generate", header], limits) == ""
    small = msgpack.packb({"f": {"request_id": "r7", "prompt": "a"}, "a": {}})
    assert request_id_of([b"generate", small], limits) == "r7"
