"""The `streamer` command end to end, as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from streamer.cli import build_parser, main
from streamer.cli.common import check_engine_args
from streamer.cli.serve import pipeline_config
from streamer.registry import default_gguf
from streamer.sources import HFSource

PROMPT = "Write a short story about a robot who learns to paint."
GREEDY_12 = ["--chat", "--max-tokens", "12", "--temperature", "0"]


def streamer(*args: str, check: bool = True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"streamer {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def test_the_command_runs_as_a_module():
    assert "usage: streamer" in streamer("--help").stdout


@pytest.mark.parametrize(
    "command",
    ["convert", "verify", "calibrate", "generate", "eval", "serve", "probe-disk", "bench", "keys"],
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: streamer {command}" in capsys.readouterr().out


@pytest.mark.slow
def test_convert_then_generate_every_model_kind(tmp_path):
    out = tmp_path / "smol"
    proc = streamer("convert", "default", str(out))
    assert f"-> {out}" in proc.stdout
    assert streamer("verify", str(out)).stdout.startswith("ok ")
    runs = {}
    for model in (str(out), str(default_gguf()), "default"):
        # dense: `default` alone would calibrate and stream (`auto`), the others cannot
        proc = streamer(
            "generate", model, "--prompt", PROMPT, *GREEDY_12, "--mode", "dense", "--json"
        )
        result = json.loads(proc.stdout)
        assert set(result) >= {"token_ids", "text", "summary"}
        assert len(result["token_ids"]) == result["summary"]["generated_tokens"] == 12
        assert result["summary"]["prompt_tokens"] == len(result["prompt_token_ids"])
        assert result["summary"]["ms_per_token"] > 0
        runs[model] = result
    # A converted directory, the GGUF itself and `default` decode alike.
    first = runs[str(out)]
    assert all(r["token_ids"] == first["token_ids"] for r in runs.values())
    assert len(first["text"].split()) >= 5

    # Without --json the same text streams to stdout.
    proc = streamer("generate", str(out), "--prompt", PROMPT, *GREEDY_12)
    assert proc.stdout.strip() == first["text"].strip()


@pytest.mark.slow
def test_generate_from_hf_directory(hf_model):
    proc = streamer(
        "generate",
        str(hf_model("opt")),
        "--prompt",
        "the quick brown fox",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    )
    result = json.loads(proc.stdout)
    assert len(result["token_ids"]) == 5
    assert result["summary"]["stop_reason"] == "length"


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "/no/such/model", "--prompt", "hi"], "not found"),
        (["convert", "/no/such/model", "/tmp/x"], "not found"),
        (["generate", "default", "--prompt", "hi", "--max-tokens", "-1"], "--max-tokens must be"),
        (["generate", "default", "--prompt", "hi", "--top-p", "1.5"], "--top-p must be"),
        (["generate", "default", "--prompt", "hi", "--window", "0"], "--window must be"),
        (["generate", "default", "--prompt", "hi", "--dram-budget", "4X"], "--dram-budget '4X'"),
        (["eval", "default", "--text", "/no/such/text"], "text file /no/such/text not found"),
        (["probe-disk", "--chunks", "4X"], "--chunks '4X'"),
        (["probe-disk", "--file-size", "big"], "--file-size 'big'"),
    ],
)
def test_bad_input_is_one_clear_line_naming_the_flag_before_any_model_is_loaded(
    args, message, tmp_path, monkeypatch, capsys
):
    """Flags are checked before the model is opened: an empty cache stays empty (before, a bad
    --max-tokens converted the default model first), and the error names the flag given."""
    monkeypatch.setenv("STREAMER_CACHE", str(tmp_path / "cache"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "cache").exists()


def test_good_flags_pass_the_early_checks(capsys):
    """The early checks refuse only what is wrong: a percentage budget is fine before the
    model's size is known (a 50% budget was once refused as 0 bytes here)."""
    args = build_parser().parse_args(
        ["generate", "--prompt", "hi", "--dram-budget", "50%", "--window", "2"]
    )
    check_engine_args(args)
    args.dram_budget = "1.5GiB"
    check_engine_args(args)


def test_flags_given_to_serve_override_its_config_file(tmp_path):
    """Every option given on the command line wins over the file, defaults included (before,
    a flag equal to its default was taken for absent and the file's value stood)."""
    path = tmp_path / "pipeline.toml"
    path.write_text("window = 8\ncontext = 1024\nconcurrency = 3\n")
    args = build_parser().parse_args(
        ["serve", "--config", str(path), "--window", "4", "--context", "2048"]
    )
    config = pipeline_config(args)
    assert (config.window, config.context, config.concurrency) == (4, 2048, 3)
    untouched = pipeline_config(build_parser().parse_args(["serve", "--config", str(path)]))
    assert (untouched.window, untouched.context) == (8, 1024)


@pytest.mark.slow
def test_convert_refuses_a_directory_holding_another_model(hf_model, tmp_path):
    out = tmp_path / "m"
    streamer("convert", str(hf_model("llama")), str(out))
    assert "nothing to do" in streamer("convert", str(hf_model("llama")), str(out)).stdout
    proc = streamer("convert", str(hf_model("opt")), str(out), check=False)
    assert proc.returncode == 2 and "already holds another model" in proc.stderr


@pytest.fixture(scope="module")
def calibrated_opt(tmp_path_factory):
    """A converted, calibrated sparse OPT, made through the command line."""
    from tests.models import make_sparse_opt

    src = make_sparse_opt(tmp_path_factory.mktemp("cli-opt-hf"))
    out = tmp_path_factory.mktemp("cli-opt") / "m"
    streamer("convert", str(src), str(out))
    proc = streamer(
        "calibrate", str(out), "--ranks", "16", "--epochs", "3", "--max-tokens", "512", "--json"
    )
    report = json.loads(proc.stdout)
    assert len(report["layers"]) == 2 and report["perplexity"]["dense"] > 1
    return out


@pytest.mark.slow
def test_generate_modes_report_telemetry(calibrated_opt):
    results = {}
    for mode in ("dense", "hybrid", "all"):
        proc = streamer(
            "generate",
            str(calibrated_opt),
            "--prompt",
            "the quick brown fox",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--ignore-eos",
            "--mode",
            mode,
            "--json",
            "--stats",
        )
        result = json.loads(proc.stdout)
        summary = result["summary"]
        assert summary["mode"] == mode
        assert {"bytes_read", "reads", "io_ms", "mem_ms", "compute_ms"} <= set(summary)
        assert len(result["steps"]) == 6  # the prompt, then one step per later token
        assert all(set(s) >= {"bytes_read", "io_ms", "layers"} for s in result["steps"])
        assert "per decoded token" in proc.stderr or mode == "dense"
        results[mode] = result
    assert results["dense"]["summary"]["bytes_read"] == 0
    assert results["hybrid"]["summary"]["bytes_read"] > results["all"]["summary"]["bytes_read"]
    # The hybrid mode computes the same dense FFN, from flash.
    assert results["hybrid"]["token_ids"] == results["dense"]["token_ids"]
    assert "mode all: DRAM budget" in proc.stderr


@pytest.mark.slow
def test_eval_prints_perplexity_per_mode(calibrated_opt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    ppl = {}
    for mode in ("dense", "oracle", "all"):
        proc = streamer("eval", str(calibrated_opt), "--text", str(text), "--mode", mode, "--json")
        out = json.loads(proc.stdout)
        assert out["mode"] == mode and out["tokens"] > 10
        # progress on stderr while the weights load and the text is scored; stdout stays JSON
        assert "load:" in proc.stderr and "tokens:   0%|" in proc.stderr
        ppl[mode] = out["perplexity"]
    assert ppl["oracle"] == pytest.approx(ppl["dense"], rel=1e-3)  # ReLU: oracle is exact
    assert ppl["all"] > 1


def test_eval_against_a_reference_gives_the_ratio_and_its_interval(calibrated_opt, tmp_path):
    from tests.models import train_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    args = ["eval", str(calibrated_opt), "--text", str(text), "--json"]
    same = json.loads(streamer(*args, "--mode", "dense", "--against", str(calibrated_opt)).stdout)
    assert same["against"]["perplexity"] == same["perplexity"]
    assert same["against"]["ratio"] == 1 and same["against"]["ratio_95"] == [1, 1]
    # the sparse mode against the same model's dense: the ratio of the two perplexities
    out = json.loads(streamer(*args, "--mode", "all", "--against", str(calibrated_opt)).stdout)
    ratio, (lo, hi) = out["against"]["ratio"], out["against"]["ratio_95"]
    assert ratio == pytest.approx(out["perplexity"] / out["against"]["perplexity"], rel=1e-3)
    assert ratio != 1 and lo < ratio < hi
    # a reference that tokenizes the text otherwise: one clear error, before anything loads
    other = tmp_path / "other"
    shutil.copytree(calibrated_opt, other)
    train_tokenizer(vocab_size=280).save(str(other / "tokenizer.json"))
    proc = streamer(*args, "--against", str(other), check=False)
    assert proc.returncode == 2 and "tokenizes the text differently" in proc.stderr
    assert "load:" not in proc.stderr


def test_flash_modes_need_a_converted_model(hf_model):
    proc = streamer(
        "generate", str(hf_model("opt")), "--prompt", "hi", "--mode", "all", check=False
    )
    assert proc.returncode == 2 and "streamer convert" in proc.stderr


def test_probe_disk_prints_a_table(tmp_path):
    proc = streamer(
        "probe-disk",
        str(tmp_path),
        "--chunks",
        "4K,64K",
        "--concurrency",
        "1,4",
        "--seconds",
        "0.05",
        "--file-size",
        "16MiB",
    )
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].split()[0] == "4Ki" and lines[-1].split()[0] == "64Ki"
    assert all(float(v) > 0 for v in lines[-1].split()[1:])


@pytest.mark.parametrize(
    "option,endpoint,message",
    [
        ("--endpoint", "http://127.0.0.1:8000", "must be ipc://PATH, tcp://HOST:PORT"),
        ("--endpoint", "tcp://127.0.0.1:{busy}", "Address already in use"),
        ("--http", "127.0.0.1:{busy}", "--http address '127.0.0.1:"),
        ("--http", "localhost", "expected HOST:PORT"),
    ],
)
def test_serve_refuses_a_bad_endpoint_before_it_loads_the_model(
    option, endpoint, message, tmp_path
):
    """The endpoints are bound first: the error is the endpoint's (the model, which does not
    exist, is never opened), in one line, with exit status 2."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = endpoint.format(busy=busy.getsockname()[1])
        proc = streamer(
            "serve", str(tmp_path / "no-model"), option, endpoint, "--insecure", check=False
        )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], proc.stderr


def test_serve_http_answers_the_openai_client_and_stops_on_sigterm(hf_model, tmp_path):
    """`serve MODEL --http HOST:PORT`: the HTTP API beside the ZeroMQ endpoint, one engine."""
    import openai

    out = tmp_path / "m"
    streamer("convert", str(hf_model("llama")), str(out), "--dtype", "float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamer", "serve", str(out), "--mode", "dense", "--insecure"]
        + ["--endpoint", f"ipc://{tmp_path}/front.sock", "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == f"http http://127.0.0.1:{port}"
        assert proc.stdout.readline().startswith("ready ipc://")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        r = c.completions.create(model="m", prompt="the quick", max_tokens=5, temperature=0)
        c.close()
        # greedy: what `streamer generate --json` gives for the same prompt
        args = ["--prompt", "the quick", "--max-tokens", "5", "--temperature", "0", "--json"]
        local = json.loads(streamer("generate", str(out), "--mode", "dense", *args).stdout)
        assert r.choices[0].text == local["text"]
        assert r.usage.completion_tokens == len(local["token_ids"])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_generate_takes_a_conversation_stop_strings_and_sampling_filters(hf_model, tmp_path):
    """--messages renders several turns with the chat template (as the library does); --stop
    ends the text before it; --top-k and friends reach the sampler."""
    src = tmp_path / "hf"
    shutil.copytree(hf_model("llama"), src)
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    conversation = [
        {"role": "user", "content": "the quick"},
        {"role": "assistant", "content": "brown fox"},
        {"role": "user", "content": "jumps"},
    ]
    (tmp_path / "c.json").write_text(json.dumps(conversation))
    args = ["generate", str(src), "--messages", str(tmp_path / "c.json"), "--mode", "dense"]
    args += ["--max-tokens", "12", "--temperature", "0", "--ignore-eos", "--json"]
    full = json.loads(streamer(*args).stdout)
    tokenizer = HFSource(src).tokenizer().build()
    assert full["prompt_token_ids"] == tokenizer.chat_messages(conversation)
    stop = full["text"][4:7]
    cut = json.loads(streamer(*args, "--stop", stop, "--top-k", "5").stdout)
    assert cut["text"] == full["text"][: full["text"].find(stop)]
    assert cut["summary"]["stop_reason"] == "stop" and cut["summary"]["ms_per_token"] > 0
    bad = streamer(*args[:2], "--prompt", "x", "--messages", str(tmp_path / "c.json"), check=False)
    assert bad.returncode == 2 and "exactly one of --prompt and --messages" in bad.stderr
