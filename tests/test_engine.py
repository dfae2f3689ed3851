"""The flash engine against the dense reference: oracle equals dense, the paper's Table 2
ordering of bytes read, and the DRAM budget."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from streamer.calibrate import CalibrationSettings, calibrate
from streamer.convert import convert
from streamer.engine import load_engine
from streamer.errors import ConfigError
from streamer.generate import Generation, SamplingParams
from streamer.layout import ConvertedModel
from streamer.predictor import META_FILE, WEIGHTS_FILE
from streamer.sources import HFSource
from tests.helpers import PROMPT, greedy_with_logits
from tests.models import make_sparse_opt


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            out = tmp_path_factory.mktemp(f"{family}-flash") / "m"
            made[family] = convert(
                HFSource(hf_model(family)), out, dtype="float32", progress=False
            ).directory
        return made[family]

    return get


def rows_budget(directory, rows: int, mode: str = "oracle", max_len: int = 64) -> int:
    """The budget that leaves `rows` cache rows per layer."""
    with load_engine(directory, mode=mode, max_len=max_len) as e:
        p, n = e.plan, e.cfg.d_ffn
        return (
            p.resident + p.predictors + p.kv_cache + p.extra + (n + p.n_layers * rows) * p.row_bytes
        )


@pytest.mark.parametrize("family", ["opt", "falcon", "falcon-sequential", "llama-relu-bias"])
@pytest.mark.parametrize("rows", [None, 20], ids=["unbounded", "tight"])
def test_oracle_equals_dense_for_relu_models(family, rows, converted):
    directory = converted(family)
    budget = None if rows is None else rows_budget(directory, rows)
    with (
        load_engine(directory, mode="dense", max_len=64) as dense,
        load_engine(
            directory,
            mode="oracle",
            window=2,
            dram_budget=budget,
            max_len=64,
            quant_resident="none",  # as stored: the budget was planned for it
        ) as oracle,
    ):
        tokens, ref = greedy_with_logits(dense, PROMPT, 16)
        tokens2, ours = greedy_with_logits(oracle, PROMPT, 16)
        assert tokens2 == tokens
        assert (ours - ref).abs().max().item() < 1e-4
        steps = oracle.telemetry.steps
        assert sum(s["bytes_read"] for s in steps) > 0
        if rows is not None:
            decode = [s for s in steps if s["tokens"] == 1]
            assert max(s["cached"] for s in decode) <= rows * oracle.cfg.n_layers
            assert sum(s["overflow"] + s["evicted"] for s in steps) > 0  # the cap was felt


@pytest.fixture(scope="module")
def sparse_opt(tmp_path_factory):
    """d = 1024 in float32: a weight vector is exactly 4 KiB, as for OPT-6.7B in float16, so
    the unbundled (window) mode can read each vector on its own with O_DIRECT."""
    src = make_sparse_opt(
        tmp_path_factory.mktemp("sparse-opt-hf"),
        hidden_size=1024,
        ffn_dim=1024,
        num_attention_heads=8,
    )
    out = convert(
        HFSource(src), tmp_path_factory.mktemp("sparse-opt") / "m", dtype="float32", progress=False
    ).directory
    calibrate(out, CalibrationSettings(ranks="32", epochs=8, max_tokens=1024), progress=False)
    return out


def per_token(directory, mode: str, tokens: int = 8, **kw) -> dict:
    with load_engine(directory, mode=mode, window=4, max_len=64, **kw) as e:
        ids = Generation(e, PROMPT, SamplingParams(max_tokens=tokens, temperature=0)).run()
        return {**e.telemetry.summary()["per_token"], "tokens": ids}


def test_bytes_per_token_fall_as_in_the_papers_table_2(sparse_opt):
    """The paper's ablation: `all` without read gaps reads what `window` reads."""
    modes = ("naive", "hybrid", "predictor", "window", "all")
    rows = {m: per_token(sparse_opt, m, read_gap=0) for m in modes}
    b = {m: r["bytes_read"] for m, r in rows.items()}
    assert b["naive"] > b["hybrid"] > b["predictor"] > b["all"] > 0
    # Same neurons, same bytes: bundling changes how they are read, not what.
    assert b["window"] == b["all"]
    # ... in fewer, larger reads (one per bundle run instead of one per vector).
    assert rows["all"]["reads"] < rows["window"]["reads"]
    assert rows["predictor"]["predicted"] < rows["hybrid"]["predicted"]


def test_read_gaps_make_fewer_reads_of_more_bytes(sparse_opt):
    """Runs of at most N unneeded neurons between two needed ones are read with them and kept in
    the window, not computed: fewer, longer reads, and the same tokens. (Windows of a quarter
    of a layer: every token reads.)"""
    with load_engine(sparse_opt, mode="all", max_len=64) as e:
        p = e.plan
        rows = e.cfg.d_ffn // 4
        budget = p.total - (e.cfg.d_ffn - rows) * p.n_layers * (p.row_bytes + p.book_bytes)
    runs = {
        g: per_token(sparse_opt, "all", read_gap=g, dram_budget=budget, quant_resident="none")
        for g in (0, 2, 8)
    }
    assert runs[0]["reads"] > runs[2]["reads"] > runs[8]["reads"] > 0
    size = {g: r["bytes_read"] / r["reads"] for g, r in runs.items()}
    assert size[0] < size[2] < size[8]
    assert runs[0]["tokens"] == runs[2]["tokens"] == runs[8]["tokens"]
    with pytest.raises(ConfigError, match="read_gap"):
        load_engine(sparse_opt, mode="all", read_gap=-1)


def test_the_summary_says_how_big_the_ffn_on_flash_is(sparse_opt):
    ffn_bytes = ConvertedModel(sparse_opt).layout.file_bytes
    for mode in ("dense", "all"):
        with load_engine(sparse_opt, mode=mode, window=4, max_len=64) as e:
            Generation(e, PROMPT, SamplingParams(max_tokens=4, temperature=0)).run()
            summary = e.telemetry.summary()
        assert summary["ffn_bytes"] == ffn_bytes, mode
    assert 0 < summary["per_token"]["bytes_read"] < ffn_bytes  # `all` reads a fraction


def test_calibration_report_and_predictor_quality(sparse_opt):
    meta = json.loads((sparse_opt / "predictors.json").read_text())
    assert meta["sparsity"] is None  # ReLU: active means output > 0
    assert set(meta["perplexity"]) == {"dense", "oracle", "predictor"}
    assert meta["perplexity"]["oracle"] == pytest.approx(meta["perplexity"]["dense"], rel=1e-6)
    for layer in meta["layers"]:
        assert 0 < layer["active"] < 0.5  # the shifted biases made it sparse
        assert layer["recall"] > 0.8
        assert layer["predicted"] < 1.0
    assert "lookahead_recall" in meta["layers"][0] and "lookahead_recall" not in meta["layers"][-1]


def test_calibration_in_bfloat16_trains_predictors_as_good(sparse_opt, tmp_path):
    """Recording in bfloat16 (half the DRAM: how a 7B model calibrates in 24 GiB) gives
    predictors of about the float32 recording's recall; the float32 ones are kept."""
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(sparse_opt, copy)
    settings = CalibrationSettings(ranks="32", epochs=8, max_tokens=1024, dtype="bfloat16")
    half = calibrate(copy, settings, progress=False)
    full = json.loads((sparse_opt / "predictors.json").read_text())
    for a, b in zip(half["layers"], full["layers"], strict=True):
        assert a["active"] == pytest.approx(b["active"], abs=0.02)
        assert a["recall"] > b["recall"] - 0.05
    assert half["perplexity"]["dense"] == pytest.approx(full["perplexity"]["dense"], rel=0.02)
    with pytest.raises(ConfigError, match="dtype must be float32"):
        CalibrationSettings(dtype="int8")


def test_budget_too_small_is_refused_with_the_numbers(sparse_opt):
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError, match="too small.*MiB"):
        load_engine(sparse_opt, mode="all", dram_budget="1MiB")
    with pytest.raises(ConfigError, match="dram_budget 'lots'"):
        load_engine(sparse_opt, mode="all", dram_budget="lots")
    assert len(os.listdir("/proc/self/fd")) == fds  # the refused engine closed its files


@pytest.mark.parametrize("budget", ["1TB", "50000000%"])
def test_a_budget_over_the_machines_memory_is_taken_with_a_warning(sparse_opt, budget, caplog):
    with caplog.at_level(logging.WARNING), load_engine(sparse_opt, "all", dram_budget=budget):
        pass
    assert f"the DRAM budget {budget}" in caplog.text and "more than this machine's" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), load_engine(sparse_opt, "all", dram_budget="300%"):
        pass
    assert "more than this machine's" not in caplog.text


@pytest.mark.slow
def test_rss_stays_within_the_budget(tmp_path):
    """A model whose FFN dominates (128 MiB of 165): with a 50% budget the process's peak RSS
    stays under the budget plus the stated fixed overhead, far below what dense needs."""
    src = make_sparse_opt(
        tmp_path / "hf", hidden_size=1024, ffn_dim=8192, num_attention_heads=8, num_hidden_layers=4
    )
    # float16, as models are stored: its matmuls go through oneDNN, which keeps memory per
    # matrix shape (the engine rounds row counts up so that it does not grow).
    out = convert(HFSource(src), tmp_path / "m", progress=False).directory
    calibrate(out, CalibrationSettings(ranks="16", epochs=2, max_tokens=256), progress=False)
    # The same model with 4-bit bundles, windows and overflow (its predictors are the same);
    # rounded to nearest: GPTQ on its 8192 neurons took 2 of the test's 3 minutes (test_gptq
    # covers it)
    q4 = ConvertedModel(out)
    q4 = convert(q4, tmp_path / "q4", quant="q4_0", gptq="off", progress=False).directory
    for name in (META_FILE, WEIGHTS_FILE):
        shutil.copy(out / name, q4 / name)
    args = "--max-tokens 48 --temperature 0 --ignore-eos --mode all --dram-budget 50% --json"
    for directory in (out, q4):
        proc = subprocess.run(
            [sys.executable, "-m", "streamer", "generate", str(directory)]
            + ["--prompt", "the quick brown", *args.split()],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        assert "DRAM budget" in proc.stderr  # printed at start
        summary = json.loads(proc.stdout)["summary"]
        mem = summary["memory"]
        assert mem["total"] <= mem["budget"] <= 0.5 * mem["model_bytes"]
        assert summary["overflow"] > 0  # the budget bites: some neurons do not fit the windows
        assert summary["peak_rss_bytes"] <= mem["budget"] + mem["overhead"]
        assert summary["bytes_read"] > 0
    assert mem["row_bytes"] == ConvertedModel(q4).layout.stride == 1536  # 4-bit rows in DRAM
