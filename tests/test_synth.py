"""`streamer synth`: 7B-shaped models, made small here with --scale and --layers. Each family
loads in `transformers` and in the engine with the same logits, is as sparse as asked, shares
active neurons between consecutive tokens, and converts and calibrates like any model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from streamer.errors import ConfigError
from streamer.sources import HFSource, load_dense
from streamer.synth import SHAPES, hf_config, synth
from tests.models import hf_logits


@pytest.mark.parametrize("like", sorted(SHAPES))
def test_synth_matches_transformers_and_is_sparse(like, tmp_path):
    report = synth(like, tmp_path / "m", layers=6, scale=16, progress=False, measure_tokens=64)
    target = SHAPES[like].active
    assert report["layers"] == 6 and report["d_ffn"] > 0
    # As sparse as asked (the measured fraction of a random draw, so within a margin).
    assert target / 2 < report["active_per_token"] < target * 2
    # Some neurons fire far more often than others (uniform firing would give 10%).
    assert report["top10_share"] > 0.3
    # Consecutive tokens share their active sets: with a window of 5 tokens, each token needs
    # far fewer new neurons than it has active (Falcon's first layer sees no context: its
    # parallel block feeds the FFN the layer's input, as the real model does).
    assert report["new_per_token_window5"] < report["active_per_token"] * 0.6
    assert json.loads((tmp_path / "m" / "synth.json").read_text())["sparsity"] > 0.9

    source = HFSource(tmp_path / "m")
    tokens = [3, 17, 250, 9, 41, 7]
    model = load_dense(source, torch.float32)
    ours = model.forward(torch.tensor(tokens), model.new_cache(8))
    ref = hf_logits(tmp_path / "m", tokens)
    assert ref.abs().max().item() > 1.0  # logits that say something
    assert (ours - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_synth_real_shapes_and_bad_arguments(tmp_path):
    hf = hf_config("opt-6.7b")
    assert (hf["hidden_size"], hf["ffn_dim"], hf["num_hidden_layers"]) == (4096, 16384, 32)
    assert hf_config("falcon-7b")["hidden_size"] == 4544
    with pytest.raises(ConfigError, match="like must be one of"):
        hf_config("gpt-5")
    with pytest.raises(ConfigError, match="power of two"):
        hf_config("opt-6.7b", scale=3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        synth("opt-6.7b", tmp_path / "full", layers=1, scale=16, progress=False)


@pytest.mark.slow
def test_synth_convert_calibrate_generate_from_the_command_line(tmp_path):
    def streamer(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "streamer", *args], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    report = json.loads(
        streamer(
            "synth",
            str(tmp_path / "hf"),
            "--like",
            "opt-6.7b",
            "--layers",
            "2",
            "--scale",
            "16",
            "--json",
        )
    )
    assert report["sparsity"] > 0.9
    streamer("convert", str(tmp_path / "hf"), str(tmp_path / "m"))
    # synth writes the predictors' calibration text: random tokens of its vocabulary.
    text = tmp_path / "hf" / "calibration.txt"
    assert len(set(text.read_text().split())) > 500
    calibration = streamer(
        "calibrate",
        str(tmp_path / "m"),
        "--text",
        str(text),
        "--ranks",
        "16",
        "--epochs",
        "3",
        "--max-tokens",
        "512",
        "--json",
    )
    assert json.loads(calibration)["calibration_tokens"] == 512
    out = json.loads(
        streamer(
            "generate",
            str(tmp_path / "m"),
            "--prompt",
            "the model",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        )
    )
    assert len(out["token_ids"]) == 4 and out["summary"]["mode"] == "all"
