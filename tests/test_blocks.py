"""Quantized bundles: each kind's round trip against the `gguf` package's arithmetic, a quantized
model against a reference that dequantizes the same blocks with that package, the sparse paths
on quantized bundles, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import quants

from streamer.blocks import BLOCK, KINDS, dequantize, quantize
from streamer.calibrate import CalibrationSettings, calibrate
from streamer.cli import main
from streamer.convert import convert
from streamer.engine import load_engine
from streamer.errors import ConfigError
from streamer.layout import ConvertedModel
from streamer.model import FFNWeights
from streamer.sources import HFSource, ffn_from_resident, load_dense
from tests.helpers import PROMPT, greedy_with_logits
from tests.models import make_hf_model, make_sparse_opt

BLOCK_KINDS = [name for name, k in KINDS.items() if k.quantized]


def rows_of_every_scale(n: int = 64, d: int = 4 * BLOCK) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen) * 4
    w[0, 5] = 40.0  # an outlier: its block's step grows, the other blocks keep theirs
    return w


@pytest.mark.parametrize("name", list(KINDS))
def test_each_kind_round_trips_within_its_known_error(name):
    k, w = KINDS[name], rows_of_every_scale()
    raw = quantize(w, k)
    assert raw.shape == (w.shape[0], k.row_bytes(w.shape[1])) and raw.dtype == np.uint8
    back = dequantize(torch.from_numpy(raw), k, torch.empty(w.shape))
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    err = (back - w).reshape(blocks.shape).abs().amax(-1)
    amax = blocks.abs().amax(-1)
    if not k.quantized:
        bits = {"f16": 11, "bf16": 8, "f32": 24}[name]
        assert (err <= amax * 2.0**-bits).all()
        return
    # the engine's dequantization is the package's, value for value
    assert np.array_equal(back.numpy(), quants.dequantize(raw, k.ggml).reshape(w.shape))
    # each block within its kind's step (q4_0 may clip its top code: a whole step), plus the
    # float16 rounding of the scale (and offset)
    step, slack = {
        "q8_0": (amax / 127, 0.5),
        "q4_0": (amax / 8, 1.0),
        "q4_1": ((blocks.amax(-1) - blocks.amin(-1)) / 15, 0.5),
    }[name]
    assert (err <= slack * step + amax * 2.0**-9).all()
    assert err.max() > 0  # it is quantized


@pytest.fixture(scope="module")
def relu(tmp_path_factory):
    """quantized(kind) -> a small ReLU (OPT) model converted with that kind (float32 resident)."""
    base = tmp_path_factory.mktemp("blocks")
    src = make_sparse_opt(base / "hf")
    made = {}

    def get(quant: str):  # "q4_1/q8_0": down in another kind
        if quant not in made:
            kind, _, down = quant.partition("/")
            made[quant] = convert(
                HFSource(src),
                base / quant.replace("/", "-"),
                dtype="float32",
                quant=kind,
                quant_down=down or None,
                progress=False,
            ).directory
        return made[quant]

    return get


class PackageDequantized:
    """The reference: a converted model's resident part and its bundles' blocks dequantized by
    the `gguf` package, not by the engine."""

    def __init__(self, directory) -> None:
        self.model = ConvertedModel(directory)
        self.config, self.description = self.model.config, "reference"

    def resident_names(self):
        return self.model.resident_names()

    def resident(self, name):
        return self.model.resident(name)

    def ffn(self, layer: int) -> FFNWeights:
        lay = self.model.layout
        raw = np.fromfile(
            self.model.ffn_path, np.uint8, lay.layer_bytes, offset=lay.layer_offsets[layer]
        ).reshape(lay.n_neurons, lay.stride)
        parts = {}
        for part, k, (a, b) in zip(lay.parts, lay.part_kinds, lay.part_spans, strict=True):
            values = quants.dequantize(raw[:, a:b], k.ggml) if k.quantized else raw[:, a:b]
            values = values.view(np.float16) if k.name == "f16" else values
            parts[part] = torch.from_numpy(np.array(values, dtype=np.float32))
        return ffn_from_resident(self.resident, self.config, layer, **{"gate": None, **parts})

    def tokenizer(self):
        return None


def budget_for_rows(directory, mode: str, rows: int) -> int:
    """The DRAM budget that gives each layer's window exactly `rows` rows."""
    with load_engine(directory, mode=mode, max_len=64) as e:
        e.plan.cache_rows = rows
        return e.plan.total


@pytest.mark.parametrize("quant", [*BLOCK_KINDS, "q4_1/q8_0", "q4_0/f16"])
def test_a_quantized_model_equals_the_package_dequantizing_the_same_blocks(quant, relu):
    directory = relu(quant)
    tokens, ref = greedy_with_logits(load_dense(PackageDequantized(directory)), PROMPT, 8)
    for mode in ("dense", "hybrid"):  # in DRAM, and whole layers read from flash per token
        with load_engine(directory, mode=mode, max_len=64) as e:
            got_tokens, got = greedy_with_logits(e, PROMPT, 8)
        assert got_tokens == tokens
        assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1/q8_0"])
def test_oracle_equals_dense_on_a_quantized_relu_model(quant, relu):
    directory = relu(quant)
    tight = budget_for_rows(directory, "oracle", 16)
    with (
        load_engine(directory, mode="dense", max_len=64) as dense,
        load_engine(
            directory,
            mode="oracle",
            window=2,
            dram_budget=tight,
            max_len=64,
            quant_resident="none",  # as stored: the budget was planned for it
        ) as oracle,
    ):
        assert oracle.plan.cache_rows == 16  # windows of quantized rows, evicting
        tokens, ref = greedy_with_logits(dense, PROMPT, 12)
        tokens2, ours = greedy_with_logits(oracle, PROMPT, 12)
        steps = oracle.telemetry.steps
    assert tokens2 == tokens
    assert (ours - ref).abs().max().item() < 1e-4
    assert sum(s["evicted"] + s["overflow"] for s in steps) > 0


def test_the_gated_path_on_quantized_bundles(hf_model, tmp_path):
    """Every neuron kept: the ranker's path equals dense; a budget that forces eviction keeps
    the tokens of the unbudgeted path; reads are the quantized records' bytes."""
    out = convert(HFSource(hf_model("llama")), tmp_path / "m", "float32", quant="q4_0").directory
    calibrate(out, CalibrationSettings(sparsity=0.0, max_tokens=256), progress=False)
    with (
        load_engine(out, mode="dense", max_len=64) as dense,
        load_engine(out, mode="all", max_len=64) as sparse,
    ):
        tokens, ref = greedy_with_logits(dense, PROMPT, 12)
        tokens2, ours = greedy_with_logits(sparse, PROMPT, 12)
    assert tokens2 == tokens
    assert (ours - ref).abs().max().item() < 1e-4
    calibrate(out, CalibrationSettings(sparsity=0.5, max_tokens=256), progress=False)
    with load_engine(out, mode="all", max_len=64) as e:
        free = greedy_with_logits(e, PROMPT, 16)[0]
    budget = budget_for_rows(out, "all", 12)
    with load_engine(out, mode="all", dram_budget=budget, max_len=64, quant_resident="none") as e:
        assert e.plan.cache_rows == 12 and e.plan.row_bytes == ConvertedModel(out).layout.stride
        tight = greedy_with_logits(e, PROMPT, 16)[0]
        steps = e.telemetry.steps
    assert tight == free
    assert sum(s["evicted"] + s["overflow"] for s in steps) > 0


def test_records_are_packed_to_512_bytes_and_hold_the_blocks(relu):
    m = json.loads((relu("q4_0") / "manifest.json").read_text())
    b = m["bundle"]
    assert b["quant"] == "q4_0" and b["alignment"] == 512
    assert b["record_bytes"] == 2 * (b["d_model"] // BLOCK) * 18  # up and down, 18-byte blocks
    assert b["stride"] == 512  # not 4096


def test_bad_kinds_and_dimensions_are_one_error_before_anything_is_written(
    tmp_path, hf_model, capsys
):
    src = hf_model("llama")
    assert main(["convert", str(src), str(tmp_path / "a"), "--quant", "q3_z"]) == 2
    err = capsys.readouterr().err
    assert "--quant kind 'q3_z' is not supported" in err and "q4_0" in err
    odd = make_hf_model("llama", tmp_path / "odd", hidden_size=48, intermediate_size=64)
    assert main(["convert", str(odd), str(tmp_path / "b"), "--quant", "q8_0"]) == 2
    err = capsys.readouterr().err
    assert "48 is not a multiple of 32" in err and "--quant q8_0" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert list(tmp_path.glob(".b.partial-*")) == []
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        convert(HFSource(odd), tmp_path / "c", quant="q4_0", progress=False)
    # the float kinds take any width
    assert convert(HFSource(odd), tmp_path / "d", quant="bf16", progress=False).converted
