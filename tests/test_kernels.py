"""The compiled sparse FFN kernel (`streamer.kernels`) against plain float64 arithmetic on the
same records, for every bundle kind, both FFN shapes and every activation; torch's fallback path
against the same reference; and the engine without a compiler."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamer import kernels
from streamer.blocks import quantize
from streamer.convert import convert
from streamer.engine import load_engine
from streamer.ffn import TokenFFN
from streamer.layout import BundleLayout
from streamer.sources import HFSource
from tests.helpers import PROMPT, greedy_with_logits

D, N = 96, 300
KINDS = [("f32", None), ("f16", None), ("bf16", None), ("q8_0", None), ("q4_0", None),
         ("q4_1", None), ("q4_1", "q8_0"), ("f16", "q8_0")]  # fmt: skip
ACTS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
}


@pytest.fixture
def kernel_off(monkeypatch):
    """The engine as it is without the kernel (STREAMER_KERNELS=off)."""
    monkeypatch.setenv("STREAMER_KERNELS", "off")
    kernels.reset()
    yield
    monkeypatch.delenv("STREAMER_KERNELS")
    kernels.reset()


def layer(gated: bool, kind: str, down: str | None, seed: int = 0):
    """A layout, its records and the float64 matrices they hold (as stored)."""
    cfg = SimpleNamespace(gated=gated, d_model=D, d_ffn=N, n_layers=1)
    lay = BundleLayout.for_config(cfg, torch.float32, kind, down)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    records = torch.zeros(N, lay.stride, dtype=torch.uint8)
    stored = {}
    for part, k, (a, b) in zip(lay.parts, lay.part_kinds, lay.part_spans, strict=True):
        w = torch.randn(N, D, generator=gen) * 0.3
        records[:, a:b] = torch.from_numpy(quantize(w, k))
        stored[part] = lay.unpack(records)[part].double()  # what the records hold
    return lay, records, stored


def reference(x, stored, rows, ids, act, biases):
    up = stored["up"][rows] @ x.double()
    if biases["up_bias"] is not None:
        up += biases["up_bias"].double()[ids]
    if "gate" in stored:
        g = stored["gate"][rows] @ x.double()
        if biases["gate_bias"] is not None:
            g += biases["gate_bias"].double()[ids]
        h = ACTS[act](g) * up
    else:
        h = ACTS[act](up)
    out = h @ stored["down"][rows]
    return out if biases["down_bias"] is None else out + biases["down_bias"].double()


def biases_for(gated: bool, with_bias: bool) -> dict:
    gen = torch.Generator().manual_seed(7)
    if not with_bias:
        return {"up_bias": None, "gate_bias": None, "down_bias": None}
    return {
        "up_bias": torch.randn(N, generator=gen),
        "gate_bias": torch.randn(N, generator=gen) if gated else None,
        "down_bias": torch.randn(D, generator=gen),
    }


def check(lay, records, stored, act, biases, k, seed=1):
    """TokenFFN over a random set of k neurons in random rows, as two parts, against the
    reference."""
    gen = np.random.default_rng(seed)
    ids = np.sort(gen.choice(N, k, replace=False))
    # the records as a window holds them: neuron ids[i] in row rows[i] of a shuffled copy
    order = gen.permutation(N)
    window = records[order].contiguous()
    rows = np.argsort(order)[ids]
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(seed))
    # the engine holds the biases in the FFN's dtype (`ffn_biases`)
    biases = {k: None if b is None else b.to(lay.dtype) for k, b in biases.items()}
    ffn = TokenFFN(lay, act, [biases])
    cut = k // 3
    out = ffn(x, 0, (window, rows[:cut], ids[:cut]), (window, rows[cut:], ids[cut:]))
    ref = reference(x[0], stored, ids, ids, act, biases)
    scale = ref.abs().max().item() + 1e-9
    assert out.shape == (1, D) and out.dtype == x.dtype
    # the kernel sums in float32; torch's path in the FFN's dtype (float16 rounds each output)
    eps = (
        2e-5
        if ffn.kernel is not None
        else {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(lay.dtype, 2e-5)
    )
    assert (out[0].double() - ref).abs().max().item() < eps * scale * max(1.0, k**0.5 / 8)
    return ffn


@pytest.mark.parametrize("kind,down", KINDS)
@pytest.mark.parametrize("gated", [True, False])
def test_the_kernel_equals_float64_arithmetic_on_every_kind(kind, down, gated):
    assert kernels.available(), "the build machine has a C compiler"
    lay, records, stored = layer(gated, kind, down)
    for act in ACTS:
        for k in (0, 1, 40, N):  # none, one, single-threaded, shared between threads
            ffn = check(lay, records, stored, act, biases_for(gated, k % 2 == 0), k)
            assert ffn.kernel is not None


@pytest.mark.parametrize("kind,down", KINDS)
def test_the_torch_fallback_equals_float64_arithmetic(kind, down, kernel_off):
    lay, records, stored = layer(True, kind, down)
    for k in (0, 1, 70, N):
        ffn = check(lay, records, stored, "silu", biases_for(True, k % 2 == 1), k)
        assert ffn.kernel is None


def test_the_kernel_gives_the_same_sums_on_one_thread_and_two():
    lay, records, _ = layer(True, "f16", None)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    ffn = TokenFFN(lay, "silu", [biases_for(True, False)])
    rows = np.arange(N)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ffn(x, 0, (records, rows, rows))
        torch.set_num_threads(2)
        two = ffn(x, 0, (records, rows, rows))
    finally:
        torch.set_num_threads(threads)
    # float32 sums in another order
    assert (one - two).abs().max().item() < 1e-5 * one.abs().max().item()


def test_rows_outside_the_records_are_refused():
    lay, records, _ = layer(True, "f32", None)
    ffn = TokenFFN(lay, "silu", [biases_for(True, False)])
    with pytest.raises(IndexError, match="outside"):
        ffn(torch.randn(1, D), 0, (records[:10], np.array([3, 10]), np.array([3, 10])))


def test_without_a_compiler_the_engine_computes_in_torch(hf_model, tmp_path, monkeypatch, caplog):
    """No compiler: one warning naming why, and the same tokens (and logits, to float32
    rounding) as the kernel's."""
    out = tmp_path / "llama"
    convert(HFSource(hf_model("llama-relu-bias")), out, dtype="float32", progress=False)
    with load_engine(out, mode="oracle", max_len=64) as engine:
        assert engine.flash_ffn.token_ffn.kernel is not None
        tokens, logits = greedy_with_logits(engine, PROMPT, 8)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("STREAMER_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("shutil.which", lambda name: None)
    kernels.reset()
    try:
        with caplog.at_level(logging.WARNING), load_engine(out, mode="oracle", max_len=64) as e:
            assert e.flash_ffn.token_ffn.kernel is None
            tokens2, logits2 = greedy_with_logits(e, PROMPT, 8)
    finally:
        kernels.reset()
    assert "computing the sparse FFN in torch" in caplog.text and "failed" in caplog.text
    assert tokens2 == tokens
    assert (logits2 - logits).abs().max().item() < 1e-4
