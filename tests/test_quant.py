"""4- and 8-bit matrices in DRAM against plain torch on the same codes, and the engine with a
quantized resident part."""

from __future__ import annotations

import logging

import pytest
import torch

from streamer.calibrate import CalibrationSettings, calibrate
from streamer.convert import convert
from streamer.engine import load_engine
from streamer.errors import ConfigError
from streamer.quant import GROUP, Q4Matrix, Q8Embedding, dequantize, quantize, quantize_resident
from streamer.sources import HFSource
from tests.helpers import PROMPT, greedy_with_logits


def test_q4_linear_equals_plain_torch_on_the_same_codes():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 4 * GROUP, generator=gen)
    x = torch.randn(3, 4 * GROUP, generator=gen).bfloat16().float()  # what the kernel sees
    m, q = Q4Matrix.of(w), quantize(w)
    ref = x @ dequantize(q).T
    got = m.linear(x)
    assert got.dtype == torch.float32 and got.shape == (3, 96)
    # the kernel rounds its output to bfloat16
    assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    assert (got - x @ w.T).abs().max() > 0  # it is the codes, not the float matrix
    assert m.nbytes < w.numel() * 2 / 3  # under a third of float16's bytes


def test_q8_embedding_rows_and_head_equal_plain_torch():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(200, 64, generator=gen)
    e = Q8Embedding(w)
    table = e.codes.float() * e.scale.float()[:, None]
    assert (table - w).abs().max() <= w.abs().amax() / 127  # half a step, with margin
    ids = torch.tensor([3, 3, 199, 0])
    assert torch.equal(e.rows(ids, torch.float32), table[ids])
    x = torch.randn(2, 64, generator=gen).bfloat16().float()
    ref = x @ table.T
    assert torch.allclose(e.linear(x), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_a_quantized_resident_part_equals_a_reference_on_the_same_codes(kind, hf_model, tmp_path):
    """The engine with `quant_resident=kind` against the dense model whose resident matrices
    were replaced by what the codes stand for: the same logits, up to bfloat16 activations."""
    out = tmp_path / "m"
    convert(HFSource(hf_model("llama")), out, dtype="float32", progress=False)
    with (
        load_engine(out, mode="dense", max_len=64) as ref,
        load_engine(out, mode="dense", max_len=64, quant_resident=kind) as quant,
    ):
        held = quantize_resident(dict(ref.model.w), kind)
        if kind == "q8":  # every projection in 8 bits, none in 4
            assert not any(isinstance(q, Q4Matrix) for q in held.values())
        for name, q in held.items():
            if isinstance(q, Q4Matrix):
                ref.model.w[name] = dequantize(quantize(ref.model.w[name]))
            elif isinstance(q, Q8Embedding):
                ref.model.w[name] = q.codes.float() * q.scale.float()[:, None]
        assert sum(not isinstance(t, torch.Tensor) for t in quant.model.w.values()) >= 9
        assert quant.plan.resident < ref.plan.resident
        seq = torch.tensor(PROMPT * 3)
        want = ref.forward(seq, ref.new_cache(64))
        got = quant.forward(seq, quant.new_cache(64))
    assert (got - want).abs().max() < 0.03 * want.abs().max()


def test_an_unknown_resident_kind_is_one_clear_error(hf_model, tmp_path):
    out = tmp_path / "m"
    convert(HFSource(hf_model("llama")), out, dtype="float32", progress=False)
    expected = "quant_resident must be one of none, q4, q8, auto, got 'q3'"
    with pytest.raises(ConfigError, match=expected):
        load_engine(out, mode="all", quant_resident="q3")


def test_auto_quantizes_the_resident_part_only_when_the_budget_needs_it(hf_model, tmp_path, caplog):
    """A budget too small for the resident part as stored but big enough in 4 bits: `auto`
    (the default) loads it in 4 bits and says so, as `q4` would; `none` refuses; with no budget
    `auto` keeps it as stored; with a budget it fits but that then leaves the windows short of
    the FFN, `auto` quantizes it too."""
    caplog.set_level(logging.INFO, logger="streamer.engine")
    out = tmp_path / "m"
    convert(HFSource(hf_model("llama")), out, dtype="float32", progress=False)
    calibrate(out, CalibrationSettings(sparsity=0.3, max_tokens=64), progress=False)
    with load_engine(out, mode="all", max_len=64, quant_resident="q4") as q:
        p = q.plan
        fixed = p.resident + p.predictors + p.kv_cache + p.extra + p.scratch_rows * p.row_bytes
        budget = fixed + p.n_layers * 8 * p.row_bytes  # the 4-bit resident part, 8 rows a layer
    with load_engine(out, mode="all", max_len=64) as stored:  # no budget: as stored
        assert all(isinstance(t, torch.Tensor) for t in stored.model.w.values())
    with load_engine(out, mode="all", max_len=64, dram_budget=budget) as auto:
        assert sum(not isinstance(t, torch.Tensor) for t in auto.model.w.values()) >= 9
        assert auto.plan.total <= budget
        got = greedy_with_logits(auto, PROMPT, 6)[0]
    assert "keeping its matrices in 4 bits" in caplog.text
    with load_engine(out, mode="all", max_len=64, dram_budget=budget, quant_resident="q4") as q:
        assert greedy_with_logits(q, PROMPT, 6)[0] == got
    with pytest.raises(ConfigError, match="too small"):
        load_engine(out, mode="all", max_len=64, dram_budget=budget, quant_resident="none")
    # a budget that holds the resident part as stored, but then only 8 rows a layer: auto
    # quantizes it, so that a bigger budget than the last one never holds fewer neurons
    with load_engine(out, mode="all", max_len=64, quant_resident="none") as stored:
        p = stored.plan
        fixed = p.resident + p.predictors + p.kv_cache + p.extra + p.scratch_rows * p.row_bytes
        roomy = fixed + p.n_layers * 8 * p.row_bytes
    assert roomy > budget
    with load_engine(out, mode="all", max_len=64, dram_budget=roomy, quant_resident="none") as n:
        assert n.plan.cache_rows == 8
    with load_engine(out, mode="all", max_len=64, dram_budget=roomy) as auto:
        assert sum(not isinstance(t, torch.Tensor) for t in auto.model.w.values()) >= 9
        assert auto.plan.cache_rows > 8
    assert "so that they hold more" in caplog.text
