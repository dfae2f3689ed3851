"""GPTQ for the 4-bit bundle kinds: on correlated inputs its products stay nearer the float ones
than rounding to nearest does, its bytes are GGUF's blocks, and the converter's setting (auto,
on, off) does what it says."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import quants

from streamer.blocks import BLOCK, KINDS, dequantize, quantize
from streamer.convert import convert
from streamer.errors import ConfigError, ModelFormatError
from streamer.gptq import quantize_columns, quantize_rows
from streamer.layout import ConvertedModel
from streamer.sources import HFSource


def correlated(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs [rows, cols] whose channels are correlated and of very different scales, as a
    trained model's are (GPTQ has nothing to exploit in white noise)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) * torch.logspace(0, -2, cols)[:, None]
    return torch.randn(rows, cols, generator=gen) @ mix


def decoded(raw: np.ndarray, name: str, shape) -> torch.Tensor:
    """The engine's dequantizing of `raw`, checked against the gguf package's, value for value."""
    k = KINDS[name]
    back = dequantize(torch.from_numpy(raw), k, torch.empty(shape))
    assert np.array_equal(back.numpy(), quants.dequantize(raw, k.ggml).reshape(shape))
    return back


@pytest.mark.parametrize("name", ["q4_0", "q4_1"])
def test_gate_and_up_rows_keep_their_products_nearer_than_rounding(name):
    n, d = 48, 4 * BLOCK
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    x = correlated(1024, d, seed=2)
    raw = quantize_rows(w, x.T @ x, KINDS[name])
    assert raw.shape == (n, KINDS[name].row_bytes(d))
    ours = decoded(raw, name, (n, d))
    nearest = decoded(quantize(w, KINDS[name]), name, (n, d))
    err = ((x @ (ours - w).T) ** 2).sum().item()
    rtn = ((x @ (nearest - w).T) ** 2).sum().item()
    assert err < 0.5 * rtn
    # each weight still within a few steps of its own value: quantized, not refitted freely
    assert (ours - w).abs().max() < w.abs().max()


@pytest.mark.parametrize("name", ["q4_0", "q4_1"])
def test_down_vectors_keep_their_products_nearer_than_rounding(name):
    n, d = 4 * BLOCK, 2 * BLOCK  # neurons, d_model; row j: neuron j's down vector
    down = torch.randn(n, d, generator=torch.Generator().manual_seed(3))
    h = correlated(1024, n, seed=4)
    raw = quantize_columns(down, h.T @ h, KINDS[name])
    assert raw.shape == (n, KINDS[name].row_bytes(d))
    ours = decoded(raw, name, (n, d))
    nearest = decoded(quantize(down, KINDS[name]), name, (n, d))
    err = ((h @ (ours - down)) ** 2).sum().item()
    rtn = ((h @ (nearest - down)) ** 2).sum().item()
    assert err < 0.5 * rtn


def ffn_bytes(directory) -> bytes:
    m = ConvertedModel(directory)
    return m.ffn_path.read_bytes()[: m.layout.file_bytes]


def test_convert_auto_runs_gptq_on_off_rounds_and_a_change_reconverts(hf_model, tmp_path):
    src = HFSource(hf_model("llama"))
    auto = convert(src, tmp_path / "auto", "float32", quant="q4_0", progress=False).directory
    off = convert(src, tmp_path / "off", "float32", quant="q4_0", gptq="off", progress=False)
    meta = json.loads((auto / "manifest.json").read_text())["gptq"]
    assert meta["texts"] == ["calibration.txt"] and meta["tokens"] > 256 and 0 < meta["damp"] < 1
    assert json.loads((off.directory / "manifest.json").read_text())["gptq"] is None
    # off is rounding to nearest, record for record
    lay = ConvertedModel(off.directory).layout
    nearest = b"".join(lay.pack(src.ffn(i)).numpy().tobytes() for i in range(src.config.n_layers))
    assert ffn_bytes(off.directory) == nearest
    assert ffn_bytes(auto) != nearest
    # the same settings again: nothing to do; another gptq setting: another model
    assert not convert(src, auto, "float32", quant="q4_0", progress=False).converted
    with pytest.raises(ModelFormatError, match="already holds another model"):
        convert(src, tmp_path / "off", "float32", quant="q4_0", progress=False)
    again = convert(src, tmp_path / "off", "float32", quant="q4_0", force=True, progress=False)
    assert again.converted
    assert ffn_bytes(tmp_path / "off") == ffn_bytes(auto)  # deterministic


def test_a_source_without_a_tokenizer(hf_model, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(hf_model("llama"), bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer, which GPTQ needs"):
        convert(HFSource(bare), tmp_path / "on", quant="q4_0", gptq="on", progress=False)
    assert not (tmp_path / "on").exists() and list(tmp_path.glob(".on.partial-*")) == []
    with pytest.raises(ConfigError, match="gptq must be one of auto, on, off"):
        convert(HFSource(bare), tmp_path / "x", quant="q4_0", gptq="yes", progress=False)
    with caplog.at_level("WARNING", logger="streamer.convert"):
        out = convert(HFSource(bare), tmp_path / "auto", quant="q4_0", progress=False).directory
    assert "rounded to nearest" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["gptq"] is None
