"""The flash layout converter: bundles, alignment, manifest, verify, and its clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from streamer.calibrate import CalibrationSettings, calibrate
from streamer.cli import main
from streamer.convert import convert, verify
from streamer.engine import load_engine
from streamer.errors import ModelFormatError
from streamer.generate import Generation, SamplingParams
from streamer.layout import RECORD_ALIGN, ConvertedModel, CorruptData
from streamer.registry import open_source
from streamer.sources import HFSource, load_dense
from tests.helpers import PROMPT, greedy_with_logits
from tests.models import make_hf_model


@pytest.mark.parametrize("family", ["llama", "opt", "falcon", "falcon-newarch"])
def test_converted_float32_decodes_like_the_source(family, hf_model, tmp_path):
    src = HFSource(hf_model(family))
    out = convert(src, tmp_path / "m", dtype="float32", progress=False).directory
    converted = open_source(out)
    assert isinstance(converted, ConvertedModel)
    tokens, ref = greedy_with_logits(load_dense(src), PROMPT, 16)
    tokens2, ours = greedy_with_logits(load_dense(converted), PROMPT, 16)
    assert tokens2 == tokens
    # float32 storage is lossless; the sums may still run in another order (oneDNN picks its
    # kernels by shape and threads), which moved logits by up to 1.8e-6 on a busy machine
    assert (ours - ref).abs().max().item() < 1e-5


def test_float16_conversion_stays_close(hf_model, tmp_path):
    src = HFSource(hf_model("llama"))
    out = convert(src, tmp_path / "m", progress=False).directory  # float16 by default
    _, ref = greedy_with_logits(load_dense(src), PROMPT, 4)
    _, ours = greedy_with_logits(load_dense(open_source(out)), PROMPT, 4)
    assert 0 < (ours - ref).abs().max().item() < 2e-2


@pytest.mark.parametrize(
    "family,parts", [("llama", ("gate", "up", "down")), ("opt", ("up", "down"))]
)
def test_bundles_hold_each_neurons_vectors_aligned(family, parts, hf_model, tmp_path):
    src = HFSource(hf_model(family))
    out = convert(src, tmp_path / "m", dtype="float32", progress=False).directory
    m = json.loads((out / "manifest.json").read_text())
    d, n = src.config.d_model, src.config.d_ffn
    assert m["bundle"]["parts"] == list(parts)
    assert m["bundle"]["stride"] % RECORD_ALIGN == 0
    assert m["bundle"]["stride"] >= m["bundle"]["record_bytes"] == len(parts) * d * 4
    raw = (out / "ffn.bin").read_bytes()
    assert len(raw) == src.config.n_layers * n * m["bundle"]["stride"]
    for layer in range(src.config.n_layers):
        info = m["layers"][layer]
        assert info["offset"] % RECORD_ALIGN == 0
        want = src.ffn(layer)
        for neuron in (0, 1, n // 2, n - 1):
            start = info["offset"] + neuron * m["bundle"]["stride"]
            record = torch.frombuffer(
                bytearray(raw[start : start + len(parts) * d * 4]), dtype=torch.float32
            )
            for j, part in enumerate(parts):
                assert torch.equal(record[j * d : (j + 1) * d], getattr(want, part)[neuron])
            # Padding after the record is zeros.
            pad = raw[start + len(parts) * d * 4 : start + m["bundle"]["stride"]]
            assert pad == bytes(len(pad))


def test_manifest_describes_the_model(hf_model, tmp_path):
    src = HFSource(hf_model("falcon"))
    out = convert(src, tmp_path / "m", progress=False).directory
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "streamer-flash" and m["format_version"] == 3
    assert m["config"]["family"] == "falcon" and m["config"]["activation"] == "relu"
    assert m["dtype"] == "float16"
    assert m["ffn"]["bytes"] == (out / "ffn.bin").stat().st_size
    assert m["resident"]["bytes"] == (out / "resident.safetensors").stat().st_size
    assert all(len(layer["sha256"]) == 64 for layer in m["layers"])
    sums = (out / "ffn.sums").read_bytes()
    assert len(sums) == 8 * m["config"]["n_layers"] * m["config"]["d_ffn"]
    assert m["sums"]["hash"] == "xxh3_64" and len(m["sums"]["sha256"]) == 64
    assert m["tokenizer"] and (out / "tokenizer.json").is_file()


def test_verify_finds_a_flipped_byte_and_a_truncated_file(hf_model, tmp_path):
    out = convert(HFSource(hf_model("opt")), tmp_path / "m", progress=False).directory
    assert verify(out, progress=False) == []
    m = json.loads((out / "manifest.json").read_text())
    with (out / "ffn.bin").open("r+b") as f:
        f.seek(m["layers"][1]["offset"] + 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = verify(out, progress=False)
    assert len(problems) == 1 and "layer 1 checksum mismatch" in problems[0]
    with (out / "ffn.bin").open("r+b") as f:
        f.truncate(m["ffn"]["bytes"] - RECORD_ALIGN)
    problems = verify(out, progress=False)
    assert len(problems) == 1 and "truncated" in problems[0]
    with pytest.raises(ModelFormatError, match="truncated"):
        ConvertedModel(out)


def test_reconverting_is_a_no_op_and_another_model_is_refused(hf_model, tmp_path):
    out = tmp_path / "m"
    assert convert(HFSource(hf_model("llama")), out, progress=False).converted
    assert not convert(HFSource(hf_model("llama")), out, progress=False).converted
    with pytest.raises(ModelFormatError, match="already holds another model"):
        convert(HFSource(hf_model("opt")), out, progress=False)
    assert json.loads((out / "manifest.json").read_text())["config"]["family"] == "llama"
    assert convert(HFSource(hf_model("opt")), out, force=True, progress=False).converted
    assert json.loads((out / "manifest.json").read_text())["config"]["family"] == "opt"


def test_a_killed_conversions_partial_build_is_removed_by_the_next(hf_model, tmp_path):
    """A conversion killed mid-way (its `finally` never ran) leaves `.OUT.partial-PID`; the next
    conversion of OUT removes it once that process is gone, and nothing else."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.partial-{dead.pid}"
    live = tmp_path / f".m.partial-{os.getppid()}"  # a conversion still running
    other = tmp_path / f".n.partial-{dead.pid}"  # another output's
    for d in (stale, live, other):
        d.mkdir()
        (d / "ffn.bin").write_bytes(b"x" * 4096)
    assert convert(HFSource(hf_model("llama")), tmp_path / "m", progress=False).converted
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name, other.name])


def test_refuses_a_non_empty_directory_without_a_model(hf_model, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(ModelFormatError, match="not empty"):
        convert(HFSource(hf_model("llama")), tmp_path / "m", progress=False)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_unknown_architecture_is_named(hf_model, tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(hf_model("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="unsupported architecture.*GPT2LMHeadModel"):
        open_source(d)


def test_missing_and_truncated_shards_are_named(tmp_path):
    d = make_hf_model("llama", tmp_path / "sharded")
    # Re-save in several shards, as large checkpoints come.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    model.save_pretrained(d, max_shard_size="100KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert load_dense(open_source(d)).cfg.n_layers == 2  # sharded checkpoints load

    shard = d / shards[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=f"{shards[1]}: unreadable or truncated"):
        open_source(d)
    shard.unlink()
    with pytest.raises(ModelFormatError, match=f"missing shard.*{shards[1]}"):
        open_source(d)


def test_unsupported_gguf_quantization_is_named(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "q2k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    # One Q2_K block (256 values in 84 bytes) per row.
    w.add_tensor(
        "token_embd.weight",
        np.zeros((4, 84), dtype=np.uint8),
        raw_dtype=gguf.GGMLQuantizationType.Q2_K,
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="token_embd.weight.*Q2_K.*not supported"):
        open_source(path)


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(ModelFormatError, match="not found"):
        open_source(tmp_path / "nope")
    (tmp_path / "x.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        open_source(tmp_path / "x.gguf")


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda m: m.pop("resident"), "the field resident is missing"),
        (lambda m: m["resident"].pop("bytes"), "the field resident.bytes is missing"),
        (lambda m: m.update(layers={}), "the field layers must be a JSON array"),
        (lambda m: m["layers"][1].update(offset="0"), "layers[1].offset must be a JSON integer"),
        (lambda m: m["config"].update(d_ffn="64"), "d_ffn must be an integer, got '64'"),
        (lambda m: m["config"].update(gated=1), "gated must be true or false"),
        (lambda m: m["config"].update(eos_token_ids=[1.5]), "eos_token_ids must be a list"),
    ],
)
def test_a_damaged_manifest_is_one_line_naming_the_field(
    damage, message, hf_model, tmp_path, capsys
):
    out = convert(HFSource(hf_model("llama")), tmp_path / "m", progress=False).directory
    m = json.loads((out / "manifest.json").read_text())
    damage(m)
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError, match=re.escape(message)):
        ConvertedModel(out)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("FAIL") and message in said[0]
    assert main(["generate", str(out), "--prompt", "hi"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and message in said[0]


@pytest.mark.parametrize("mode", ["dense", "all", "naive"])
def test_corrupt_flash_is_an_error_naming_layer_and_neuron_never_output(mode, hf_model, tmp_path):
    """One flipped byte in one bundle: every path that reads it (a whole layer, a token's
    bundles) stops with an error naming the layer and the neuron, and the rest reads fine."""
    src = HFSource(hf_model("llama"))
    out = convert(src, tmp_path / "m", progress=False).directory
    if mode == "all":
        calibrate(out, CalibrationSettings(sparsity=0.0, max_tokens=64), progress=False)
    lay = ConvertedModel(out).layout
    with (out / "ffn.bin").open("r+b") as f:
        f.seek(lay.offset(1, 7) + 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with (
        pytest.raises(CorruptData, match="layer 1 neuron 7 does not match its checksum"),
        load_engine(out, mode=mode, dtype="float32") as engine,  # dense reads it here
    ):
        Generation(engine, [5, 17, 42], SamplingParams(max_tokens=4, temperature=0)).run()


def test_verify_and_loading_find_changed_or_missing_calibration_files(hf_model, tmp_path):
    out = convert(HFSource(hf_model("llama")), tmp_path / "m", progress=False).directory
    calibrate(out, CalibrationSettings(sparsity=0.3, max_tokens=64), progress=False)
    assert verify(out, progress=False) == []
    weights = out / "ranker.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    assert verify(out, progress=False) == [
        "ranker.safetensors: checksum mismatch (calibrate the model again)"
    ]
    with pytest.raises(ModelFormatError, match="ranker.safetensors: checksum mismatch"):
        load_engine(out, mode="all")
    weights.unlink()
    assert verify(out, progress=False) == [
        "ranker.safetensors is missing (calibrate the model again)"
    ]
