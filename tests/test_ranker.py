"""The gated ranker: its 4-bit copy, the sparse path it drives against the dense one, what it
makes the engine read, and the files it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streamer.calibrate import CalibrationSettings, calibrate
from streamer.convert import convert
from streamer.engine import load_engine
from streamer.errors import ConfigError, ModelFormatError
from streamer.flash import Runs
from streamer.layout import ConvertedModel
from streamer.quant import GROUP, dequantize, quantize
from streamer.ranker import META_FILE, GateRanker, select
from streamer.sources import HFSource
from tests.helpers import PROMPT, greedy_with_logits
from tests.models import make_hf_model


@pytest.fixture(scope="module")
def llama(hf_model, tmp_path_factory):
    """calibrated(sparsity) -> a converted SwiGLU model with a ranker for that sparsity."""
    made = {}

    def get(sparsity: float):
        if sparsity not in made:
            out = tmp_path_factory.mktemp(f"llama-{sparsity}") / "m"
            convert(HFSource(hf_model("llama")), out, dtype="float32", progress=False)
            settings = CalibrationSettings(sparsity=sparsity, max_tokens=512)
            made[sparsity] = (out, calibrate(out, settings, progress=False))
        return made[sparsity]

    return get


def test_quantize_round_trips_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 4 * GROUP, generator=gen) * torch.rand(48, 1, generator=gen)
    q = quantize(w)
    assert q["codes"].dtype == torch.uint8 and q["codes"].shape == (48, 2 * GROUP)
    err = (dequantize(q) - w).abs().reshape(48, 4, GROUP).amax(-1)
    # half a step of each group, plus the scale's and offset's bfloat16 rounding
    step = q["scale"].float()
    assert (err <= 0.5 * step + 2**-7 * w.abs().reshape(48, 4, GROUP).amax(-1) + 1e-6).all()
    # a group that is already on the 16-level grid comes back as it was
    grid = torch.arange(16.0).repeat(2).reshape(1, GROUP) * 0.25 - 1.0
    assert torch.equal(dequantize(quantize(grid)), grid)


def test_scores_equal_a_plain_torch_reference(llama):
    directory, _ = llama(0.5)
    model = ConvertedModel(directory)
    ranker = GateRanker.build([model.ffn(0)], "silu")
    x = torch.randn(3, model.config.d_model)
    w = dequantize(ranker.quantized[0])
    n = model.config.d_ffn
    y = x.bfloat16().float() @ w.T
    ref = (F.silu(y[:, :n]) * y[:, n:]).abs()
    assert torch.allclose(ranker.scores(0, x), ref, rtol=2e-2, atol=2e-3)


def test_the_sparse_path_keeping_every_neuron_equals_dense(llama):
    """Sparsity 0: every neuron selected; the flash path's logits equal dense's."""
    directory, report = llama(0.0)
    assert all(row["selected"] == 1.0 for row in report["layers"])
    with (
        load_engine(directory, mode="dense", max_len=64) as dense,
        load_engine(directory, mode="all", max_len=64) as sparse,
    ):
        tokens, ref = greedy_with_logits(dense, PROMPT, 12)
        tokens2, ours = greedy_with_logits(sparse, PROMPT, 12)
    assert tokens2 == tokens
    assert (ours - ref).abs().max().item() < 1e-4


def test_calibration_reports_sparsity_and_both_perplexities(llama):
    directory, report = llama(0.5)
    assert report["fit"] == "ranker" and len(report["layers"]) == 2
    for row in report["layers"]:
        assert row["selected"] == pytest.approx(0.5, abs=0.02)
        assert 0.5 < row["mass_recall"] <= 1
    assert set(report["perplexity"]) == {"dense", "sparse"}
    assert not (directory / "predictors.json").exists()  # one selection per model
    saved = json.loads((directory / META_FILE).read_text())
    assert saved["kind"] == "gated-ranker" and len(saved["thresholds"]) == 2


def budget_of(directory, rows: int) -> int:
    """A DRAM budget that leaves `rows` window rows a layer."""
    with load_engine(directory, mode="all", max_len=64) as e:
        p, n = e.plan, e.cfg.d_ffn
    return p.resident + p.predictors + p.kv_cache + p.extra + (n + p.n_layers * rows) * p.row_bytes


@pytest.mark.parametrize("read_gap", [0, 2])
def test_reads_are_what_the_selection_named_before_the_read(llama, read_gap):
    """Per decoded token and layer: the selection comes first, from the FFN input alone; then
    the reader is asked for exactly the selected neurons the window lacks, in order, and (read
    gaps) the short runs between two of them that the window does not hold either. Windows of
    20 rows: every token reads."""
    directory, _ = llama(0.5)
    events: list[tuple] = []
    budget = budget_of(directory, 20)
    with load_engine(
        directory, "all", dram_budget=budget, max_len=64, read_gap=read_gap, quant_resident="none"
    ) as e:
        assert e.plan.cache_rows == 20
        ffn, lay = e.flash_ffn, ConvertedModel(directory).layout
        predict, read = ffn.predictors.predict, ffn.reader.read

        def spy_predict(layer, x):
            ids = predict(layer, x)
            events.append(("select", layer, ids, ffn.caches[layer].cached.copy()))
            return ids

        def spy_read(reqs, stats=None):
            if isinstance(reqs, Runs):  # bundle reads (a prompt's layer: a list of chunks)
                pairs = list(zip(reqs.offsets.tolist(), reqs.lengths.tolist(), strict=True))
            else:
                pairs = [(off, len(view)) for off, view in reqs]
            events.append(("read", pairs))
            return read(reqs, stats)

        ffn.predictors.predict, ffn.reader.read = spy_predict, spy_read
        greedy_with_logits(e, PROMPT, 8)
    selects = [i for i, ev in enumerate(events) if ev[0] == "select"]
    assert len(selects) == 8 * 2
    checked = gaps = 0
    for i in selects:
        _, layer, ids, cached = events[i]
        missing = ids[~np.isin(ids, cached)].tolist()
        want = set(missing)
        for a, b in zip(missing, missing[1:], strict=False):
            between = set(range(a + 1, b))
            if len(between) <= read_gap and not between & set(cached.tolist()):
                want |= between
        nxt = events[i + 1] if i + 1 < len(events) else ("select",)
        asked = []
        if nxt[0] == "read":
            for off, size in nxt[1]:
                first = (off - lay.layer_offsets[layer]) // lay.stride
                asked += range(first, first + size // lay.stride)
        assert asked == sorted(want)
        checked += len(asked)
        gaps += len(want) - len(missing)
    assert checked > 0  # some tokens did read
    assert (gaps > 0) == (read_gap > 0)


def test_budgets_that_force_eviction_keep_the_tokens(llama):
    directory, _ = llama(0.5)
    with load_engine(directory, mode="all", max_len=64) as e:
        free = greedy_with_logits(e, PROMPT, 16)[0]
    budget = budget_of(directory, 20)
    with load_engine(directory, "all", dram_budget=budget, max_len=64, quant_resident="none") as e:
        assert e.plan.cache_rows == 20
        tight = greedy_with_logits(e, PROMPT, 16)[0]
        steps = e.telemetry.steps
    assert tight == free
    assert sum(s["evicted"] + s["overflow"] for s in steps) > 0


def test_a_ranker_from_another_model_is_refused(llama, tmp_path):
    directory, _ = llama(0.5)
    other = tmp_path / "other"
    src = make_hf_model("llama", tmp_path / "hf", seed=1)
    convert(HFSource(src), other, dtype="float32", progress=False)
    for name in ("ranker.json", "ranker.safetensors"):
        shutil.copy(directory / name, other / name)
    with pytest.raises(ModelFormatError, match="calibrated for another model"):
        load_engine(other, mode="all", max_len=64)
    (other / "ranker.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="ranker cannot be read"):
        load_engine(other, mode="all", max_len=64)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_a_sparsity_outside_0_1_is_one_clear_error(sparsity):
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\)"):
        CalibrationSettings(sparsity=sparsity)


@pytest.mark.parametrize("gap", [0, 1, 3])
def test_gap_filling_selects_the_runs_between_selected_neurons(gap):
    gen = torch.Generator().manual_seed(gap)
    for _ in range(50):
        score = torch.rand(64, generator=gen)
        ids = np.flatnonzero(score.numpy() > 0.6)
        want = set(ids.tolist())
        for a, b in zip(ids[:-1], ids[1:], strict=True):
            if b - a - 1 <= gap:
                want.update(range(a + 1, b))
        got = select(score, 0.6, gap)
        assert got.tolist() == sorted(want)
    assert len(select(score, 0.6, 64)) == ids[-1] - ids[0] + 1  # one run, first to last
