"""`streamer bench MODEL`: the paper's Tables 2 and 3 on this machine, in one run, on one model.

With one DRAM budget (default 50% of the model) and cold reads, it measures in turn:
1. the disk itself (`probe_disk`) at the model's bundle size and the engine's concurrency, and
   after the rows at the `all` row's mean read size (the base of its I/O efficiency);
2. the ablation rows `naive`, `hybrid`, `predictor`, `window`, `all` of the single-process engine
   (Table 2: bytes read, reads, achieved read throughput per token; Table 3: I/O, memory
   management and compute ms per token);
3. the pipeline (`workers/`) with overlap and `--serial`;
4. a peer users pick today: `transformers` + `accelerate` with disk offload at the same budget,
   its files dropped from the page cache before each token;
then the ratios of that one run. Output: a Markdown table (printed), `bench.json` and
`bench.png` under `--out`. Each row runs the same text: its first `PROMPT_TOKENS` tokens as the
prompt, then one token per step (teacher-forced) for `--tokens` tokens or `--max-seconds`,
whichever comes first, and reports per token the mean split (which adds up to the mean) and the
median and range of the total. Teacher-forced, not greedy: a random (synthetic) model decodes
the same token over and over, whose active set hardly changes, which would flatter the window.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import torch
from tqdm import tqdm

from streamer.apps.bench_report import PIPELINE_ROWS, chart
from streamer.calibrate import shipped_text
from streamer.cpus import DEFAULT_CONCURRENCY, parse_cpus, usable_cpus
from streamer.engine import load_engine
from streamer.errors import ConfigError
from streamer.flash import ALIGN, probe_disk, probe_reads
from streamer.layout import ConvertedModel
from streamer.memory import nbytes, parse_budget, rss_bytes
from streamer.quant import RESIDENT_KINDS
from streamer.registry import load_tokenizer
from streamer.window import READ_GAP
from workers.config import PipelineConfig, plan_pipeline
from workers.launcher import Pipeline

ENGINE_ROWS = ("dense", "naive", "hybrid", "predictor", "window", "all")
ROWS = (*ENGINE_ROWS, *PIPELINE_ROWS, "accelerate")
PROMPT_TOKENS = 16  # of the bench text: the prompt; the tokens after it are decoded one by one
# The paper's DRAM split for Falcon-7B [4]: fractions of the model.
PAPER_SPLIT_FALCON = {
    "embeddings": 0.042,
    "attention": 0.194,
    "predictors": 0.04,
    "window": 0.253,
    "total": 0.5293,
}
# Table 3, CPU: speed-up of all techniques over naive.
PAPER_SPEEDUP = {"opt": 4.8, "falcon": 4.4}


@dataclass
class BenchSettings:
    dram_budget: str = "50%"
    window: int = 4
    tokens: int = 8  # decoded tokens per row, at most
    max_seconds: float = 60.0  # per row, decoding; a row stops after the token that passes it
    rows: tuple[str, ...] = ROWS
    hf: Path | None = None  # the peer's model: the Hugging Face directory converted from
    out: Path = Path("bench")
    concurrency: int = DEFAULT_CONCURRENCY
    probe_seconds: float = 2.0
    text: Path | None = None  # the text each row runs; None: the held-out text shipped
    threads: int = field(default_factory=lambda: len(usable_cpus()))
    compute_cpus: str = ""  # the pipeline rows' affinity (PipelineConfig)
    io_cpus: str = ""
    lookahead_p: float = 0.0  # the pipeline rows' look-ahead cut (PipelineConfig)
    # the engine rows' resident part (load_engine's quant_resident: auto, as the engine's default)
    quant_resident: str = "auto"
    read_gap: int = READ_GAP  # the engine and pipeline rows'
    dtype: str | None = None  # the engine rows' compute dtype (None: each mode's default)
    # other conversions of the same model (`convert --quant KIND`): an `all` row each, named
    # all-KIND, at the same DRAM budget in bytes as the model's own rows
    also: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown or not self.rows:
            raise ConfigError(f"--rows takes some of {', '.join(ROWS)}, got {unknown or 'none'}")
        if self.tokens < 2 or self.max_seconds <= 0 or self.window < 1:
            raise ConfigError("--tokens must be >= 2, --max-seconds > 0 and --window >= 1")
        if not 0 <= self.lookahead_p < 1:
            raise ConfigError(f"--lookahead-p must be in [0, 1), got {self.lookahead_p}")
        if self.quant_resident in RESIDENT_KINDS and set(self.rows) & {
            *PIPELINE_ROWS,
            "accelerate",
        }:
            raise ConfigError(
                "--quant-resident is for the engine rows: leave the pipeline and accelerate "
                "rows out with --rows"
            )
        parse_cpus(self.compute_cpus, "--compute-cpus")  # before any row runs
        parse_cpus(self.io_cpus, "--io-cpus")


# --------------------------------------------------------------------------- measuring


def reset_peak_rss() -> None:
    """Start a new peak (VmHWM) for this process: each row's own peak."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (the pipeline's /dev/shm rows) counted once in all."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _storage_read_bytes() -> int:
    """Bytes this process made the kernel fetch from storage (page faults on mapped files too)."""
    with contextlib.suppress(OSError), open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def row_stats(name: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A row from per-token steps: means of every counter, median and range of the total."""
    if not steps:
        raise ConfigError(f"bench row {name}: no token was decoded")
    skip = ("step", "tokens")
    keys = [k for k, v in steps[0].items() if isinstance(v, int | float) and k not in skip]
    row: dict[str, Any] = {"row": name, "tokens": len(steps)}
    for k in keys:
        row[k] = round(statistics.fmean(s[k] for s in steps), 3)
    totals = [s["total_ms"] for s in steps]
    row["median_ms"] = round(statistics.median(totals), 3)
    row["min_ms"], row["max_ms"] = round(min(totals), 3), round(max(totals), 3)
    io = row.get("io_ms", 0.0)
    row["read_gb_per_s"] = round(row.get("bytes_read", 0) / io / 1e6, 3) if io > 0 else None
    row.update(extra)
    return row


def _text_ids(directory: Path, settings: BenchSettings) -> list[int]:
    """The prompt and the tokens fed after it, from the bench text."""
    tokenizer = load_tokenizer(ConvertedModel(directory))
    if settings.text is not None and not settings.text.is_file():
        raise ConfigError(f"bench text {settings.text} not found")
    text = settings.text.read_text() if settings.text else shipped_text("heldout.txt")
    need = PROMPT_TOKENS + settings.tokens
    ids = tokenizer.encode(text)[:need]
    if len(ids) < need:
        raise ConfigError(f"the bench text has {len(ids)} tokens; --tokens needs {need}")
    return ids


def _decode(forward, ids: list[int], settings: BenchSettings, bar) -> list[int]:
    """The prompt, then the text's next tokens one per step until --tokens or --max-seconds;
    the model's greedy prediction at each step (the same for every row that computes right)."""
    logits = forward(ids[:PROMPT_TOKENS])
    bar.update(1)
    out: list[int] = []
    t0 = time.perf_counter()
    for token in ids[PROMPT_TOKENS:]:
        if time.perf_counter() - t0 >= settings.max_seconds:
            break
        out.append(int(logits[-1].argmax()))
        logits = forward([token])
        bar.update(1)
    return out


def engine_row(directory: Path, mode: str, ids: list[int], settings: BenchSettings, bar):

    reset_peak_rss()
    max_len = len(ids) + 1
    with load_engine(
        directory,
        mode=mode,
        window=settings.window,
        # dense holds the whole model: the reference, outside any budget
        dram_budget=None if mode == "dense" else settings.dram_budget,
        concurrency=settings.concurrency,
        max_len=max_len,
        quant_resident=None if mode == "naive" else settings.quant_resident,
        dtype=settings.dtype,
        read_gap=settings.read_gap,
    ) as e:
        cache = e.new_cache(max_len)

        def forward(tokens: list[int]) -> torch.Tensor:
            logits = e.forward(torch.tensor(tokens), cache, last_only=True)
            if e.readers and e.readers[0].sizes is None:  # after the prompt: each read's size
                e.readers[0].sizes = {}
            return logits

        out = _decode(forward, ids, settings, bar)
        sizes = e.readers[0].sizes if e.readers else None
        plan = e.plan
        # what the embeddings, LM head and final norm take in DRAM (quantized or not)
        embed = sum(nbytes(t) for k, t in e.model.w.items() if not k.startswith("layers."))
        steps = [s for s in e.telemetry.steps[1:] if s["tokens"] == 1]
        prefill = e.telemetry.steps[0]
    memory = {
        "peak_rss": rss_bytes(peak=True),
        "planned": plan.total,
        "overhead": plan.overhead,
        "budget": plan.budget,
    }
    return row_stats(
        mode,
        steps,
        token_ids=out,
        prefill_ms=prefill["total_ms"],
        memory=memory,
        plan=plan,
        embed_bytes=embed,
        read_sizes=sizes or {},
    )


async def _pipeline_row(directory: Path, serial: bool, ids, settings, run_dir: Path, bar):

    run_dir.mkdir(mode=0o700)
    threads = settings.threads
    if settings.compute_cpus:  # compute runs no more threads than it has CPUs
        threads = min(threads, len(parse_cpus(settings.compute_cpus, "--compute-cpus")))
    config = PipelineConfig(
        model=str(directory),
        endpoint=f"ipc://{run_dir}/front.sock",
        run_dir=str(run_dir),
        window=settings.window,
        dram_budget=settings.dram_budget,
        concurrency=settings.concurrency,
        serial=serial,
        compute_threads=threads,
        compute_cpus=settings.compute_cpus,
        io_cpus=settings.io_cpus,
        lookahead_p=settings.lookahead_p,
        read_gap=settings.read_gap,
        context=len(ids) + 1,
    )
    async with Pipeline.launch(config) as p:
        engine = p.engine  # the front end's side of the stages: the same forward as the rows'
        assert engine is not None
        cache = engine.new_cache(len(ids) + 1)

        def forward(tokens: list[int]) -> torch.Tensor:
            return engine.forward(torch.tensor(tokens), cache)

        out = await anyio.to_thread.run_sync(_decode, forward, ids, settings, bar)
        steps = [s for s in engine.telemetry.steps[1:] if s["tokens"] == 1]
        pids = [os.getpid(), *(st.proc.pid for st in p.stages.values() if st.proc is not None)]
        memory = {"pss_at_end": sum(_pss(pid) for pid in pids), "processes": len(pids)}
    return steps, out, memory


def pipeline_row(directory: Path, serial: bool, ids: list[int], settings, bar) -> dict[str, Any]:

    with tempfile.TemporaryDirectory(prefix="streamer-bench-") as tmp:
        steps, out, memory = anyio.run(
            _pipeline_row, directory, serial, ids, settings, Path(tmp) / "run", bar
        )
    row = row_stats("serial" if serial else "pipeline", steps, token_ids=out, memory=memory)
    # Latency over the larger of the two things that must happen: reading, and computing.
    bound = max(row.get("io_ms", 0.0), row.get("compute_ms", 0.0))
    row["overlap"] = round(row["total_ms"] / bound, 3) if bound > 0 else None
    return row


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def accelerate_row(hf_dir: Path, budget: int, ids: list[int], settings, offload: Path, bar):
    """transformers + accelerate with disk offload: `device_map="auto"`, `max_memory` = the
    budget, what does not fit in `offload_folder` (or read from the checkpoint itself); every
    file it can read dropped from the page cache before each token."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ConfigError(f"the accelerate row needs transformers and accelerate ({e})") from None

    reset_peak_rss()
    hf_config = json.loads((hf_dir / "config.json").read_text())
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float16"
    offload.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir,
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=str(offload),
        dtype=getattr(torch, dtype),
        low_cpu_mem_usage=True,
    )
    load_s = time.perf_counter() - t0
    placement: dict[str, int] = {}
    for device in getattr(model, "hf_device_map", {}).values():
        placement[str(device)] = placement.get(str(device), 0) + 1
    files = [p for d in (hf_dir, offload) for p in d.rglob("*") if p.is_file()]
    steps: list[dict[str, Any]] = []
    past = None

    def forward(tokens: list[int]) -> torch.Tensor:
        nonlocal past
        _drop_cache(files)
        read0, t = _storage_read_bytes(), time.perf_counter()
        with torch.inference_mode():
            result = model(input_ids=torch.tensor([tokens]), past_key_values=past, use_cache=True)
        past = result.past_key_values
        steps.append(
            {
                "tokens": len(tokens),
                "bytes_read": _storage_read_bytes() - read0,
                "total_ms": (time.perf_counter() - t) * 1e3,
            }
        )
        return result.logits[0].float()

    out = _decode(forward, ids, settings, bar)
    memory = {"peak_rss": rss_bytes(peak=True), "budget": budget}
    return row_stats(
        "accelerate",
        steps[1:],
        token_ids=out,
        load_s=round(load_s, 1),
        placement=placement,
        memory=memory,
    )


# --------------------------------------------------------------------------- the run


def budget_split(directory: Path, plan, embed: int) -> dict[str, float]:
    """The DRAM budget as fractions of the model, as the paper gives it for Falcon-7B; `embed`:
    the bytes of the resident tensors outside the layers (embeddings, LM head, final norm)."""

    model = ConvertedModel(directory)
    m = plan.model_bytes
    split = {
        "embeddings": embed / m,
        "attention": (plan.resident - embed) / m,
        "predictors": plan.predictors / m,
        "window": plan.caches / m,
        "other": (plan.kv_cache + plan.staging) / m,
    }
    split["total"] = sum(split.values())
    split["window_of_ffn"] = plan.cache_rows / model.config.d_ffn
    return {k: round(v, 4) for k, v in split.items()}


def ratios(rows: dict[str, dict[str, Any]], probe: dict[str, Any] | None) -> dict[str, Any]:
    def per_token(name: str) -> float | None:
        return rows.get(name, {}).get("median_ms")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    all_ms = per_token("all")
    io_eff = None
    if "all" in rows and probe and rows["all"].get("read_gb_per_s"):
        io_eff = round(rows["all"]["read_gb_per_s"] / probe["gb_per_s"], 3)
    return {
        "all_vs_naive": ratio(per_token("naive"), all_ms),
        # the whole model in DRAM over streaming within the budget: > 1 where sparsity wins
        "all_vs_dense": ratio(per_token("dense"), all_ms),
        "all_vs_accelerate": ratio(per_token("accelerate"), all_ms),
        # the all row over dense plus what the disk takes for the same reads (probe_bound):
        # the engine's own cost beyond computing and reading
        "all_vs_bound": ratio(
            all_ms, (per_token("dense") or 0) + rows.get("all", {}).get("bound", {}).get("io_ms", 0)
        )
        if all_ms and "dense" in rows and "bound" in rows.get("all", {})
        else None,
        "pipelined_vs_serial": ratio(per_token("serial"), per_token("pipeline")),
        "io_efficiency": io_eff,
        "overlap": rows.get("pipeline", {}).get("overlap"),
        # the time the all row spent checking what it read (BundleSums), of its total
        "checksum_share": ratio(
            rows.get("all", {}).get("check_ms"), rows.get("all", {}).get("total_ms")
        ),
    }


def run_bench(directory: Path, settings: BenchSettings, progress: bool = True) -> dict[str, Any]:

    try:
        import matplotlib  # noqa: F401  (the chart, at the end: fail before the run, not after)
    except ImportError:
        raise ConfigError("bench needs matplotlib: pip install 'streamer[bench]'") from None
    torch.set_num_threads(settings.threads)
    model = ConvertedModel(directory)
    cfg, lay = model.config, model.layout
    model_bytes = model.model_bytes
    budget = parse_budget(settings.dram_budget, model_bytes)
    if budget is None:
        raise ConfigError("bench needs a DRAM budget (--dram-budget)")
    hf = settings.hf or _source_dir(model)
    if "accelerate" in settings.rows and hf is None:
        raise ConfigError(
            f"the accelerate row needs the Hugging Face directory {directory} was converted "
            "from: give --hf DIR, or leave the row out with --rows"
        )
    ids = _text_ids(directory, settings)
    also = _other_kinds(model, settings.also)  # before the first row runs
    settings.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "model": str(directory),
        "family": cfg.family,
        "model_bytes": model_bytes,
        "quant": lay.quant_name,
        "dram_budget": budget,
        "window": settings.window,
        "prompt_tokens": PROMPT_TOKENS,
        "text": str(settings.text or "streamer/data/heldout.txt"),
        "machine": machine(),
        "settings": {k: str(v) for k, v in asdict(settings).items()},
    }
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    say(f"bench {directory}: {model_bytes / 1e9:.2f} GB, budget {budget / 1e9:.2f} GB")
    # The model's own bundle file, at random aligned offsets: the disk the rows read from.
    probe = probe_disk(
        model.ffn_path, [lay.stride], [settings.concurrency], seconds=settings.probe_seconds
    )[0]
    report["probe"] = probe
    say(
        f"probe: {probe['gb_per_s']:.3f} GB/s for {lay.stride // 1024} KiB reads, "
        f"{settings.concurrency} in flight{'' if probe['direct'] else ' (buffered!)'}"
    )
    rows: dict[str, dict[str, Any]] = {}
    cannot = _pipeline_cannot_run(directory, settings, len(ids) + 1)  # before any row runs
    for name in settings.rows:
        if name in PIPELINE_ROWS and cannot:
            rows[name] = {"row": name, "skipped": cannot}
            say(f"{name}: skipped ({cannot})")
            continue
        bar = tqdm(total=settings.tokens + 1, desc=f"{name:>10}", unit="tok", disable=not progress)
        t0 = time.perf_counter()
        try:
            row = _row(name, directory, hf, budget, ids, settings, bar, report)
        except ConfigError as e:  # recorded; the rows that ran are still reported
            rows[name] = {"row": name, "skipped": str(e)}
            say(f"{name}: skipped ({e})")
            continue
        finally:
            bar.close()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        say(f"{name}: {row['median_ms']:.1f} ms/token (median of {row['tokens']})")
    same_budget = replace(settings, dram_budget=str(budget))
    for name, other in also.items():
        bar = tqdm(total=settings.tokens + 1, desc=f"{name:>10}", unit="tok", disable=not progress)
        t0 = time.perf_counter()
        row = engine_row(other, "all", ids, same_budget, bar)
        row.pop("plan"), row.pop("embed_bytes")
        bar.close()
        row["seconds"], row["model"] = round(time.perf_counter() - t0, 1), str(other)
        rows[name] = row
        say(f"{name}: {row['median_ms']:.1f} ms/token (median of {row['tokens']})")
    report["rows"] = rows
    if "all" in rows and rows["all"].get("reads"):
        # `all` merges adjacent bundles into longer reads: its efficiency is against what the
        # disk does at its mean read size (rounded up to O_DIRECT's 4 KiB), same concurrency.
        size = rows["all"]["bytes_read"] / rows["all"]["reads"]
        chunk = max(int(-(-size // ALIGN)) * ALIGN, ALIGN)
        probe = probe_disk(
            model.ffn_path, [chunk], [settings.concurrency], seconds=settings.probe_seconds
        )[0]
        report["probe_all"] = probe
        say(f"probe at the all row's mean read size: {probe['gb_per_s']:.3f} GB/s, {chunk} B")
        rows["all"]["bound"] = probe_reads(
            model.ffn_path,
            rows["all"]["read_sizes"],
            rows["all"]["tokens"],
            settings.concurrency,
            settings.probe_seconds,
        )
        say(f"the disk's time for the all row's reads: {rows['all']['bound']['io_ms']:.1f} ms")
    report["ratios"] = ratios(rows, probe)
    for name in also:
        report["ratios"][f"{name}_bytes_vs_all"] = _ratio_of(rows, name, "all", "bytes_read")
        report["ratios"][f"{name}_ms_vs_all"] = _ratio_of(rows, name, "all", "median_ms")
    report["paper"] = {
        "speedup_all_vs_naive_cpu": PAPER_SPEEDUP.get(cfg.family),
        "falcon_7b_split": PAPER_SPLIT_FALCON,
    }
    (settings.out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    title = (
        f"{directory} (FFN {lay.quant_name}), DRAM budget {budget / 1e9:.2f} GB "
        f"({settings.dram_budget})\n{report['machine']}"
    )
    chart(rows, settings.out / "bench.png", title)
    return report


def _row(name, directory, hf, budget, ids, settings, bar, report) -> dict[str, Any]:
    if name in ENGINE_ROWS:
        row = engine_row(directory, name, ids, settings, bar)
        plan, embed = row.pop("plan"), row.pop("embed_bytes")
        if name == "all":
            report["budget_split"] = budget_split(directory, plan, embed)
        return row
    if name in PIPELINE_ROWS:
        return pipeline_row(directory, name == "serial", ids, settings, bar)
    offload = settings.out / "offload"
    try:
        return accelerate_row(hf, budget, ids, settings, offload, bar)
    finally:  # scratch: what accelerate wrote (nothing, for a safetensors checkpoint)
        shutil.rmtree(offload, ignore_errors=True)


def _pipeline_cannot_run(directory: Path, settings: BenchSettings, context: int) -> str:
    """Why the pipeline rows cannot run at this budget ("" when they can), before any row."""
    if not set(settings.rows) & set(PIPELINE_ROWS):
        return ""
    config = PipelineConfig(
        model=str(directory),
        dram_budget=settings.dram_budget,
        window=settings.window,
        context=context,
    )
    try:
        plan_pipeline(config)
    except ConfigError as e:
        return str(e)
    return ""


def _other_kinds(model: ConvertedModel, dirs: tuple[Path, ...]) -> dict[str, Path]:
    """all-KIND -> directory, for other conversions of the model; ConfigError for one that
    is not the same model or repeats a kind."""
    out: dict[str, Path] = {}
    for d in dirs:
        other = ConvertedModel(d)
        if other.manifest["config"] != model.manifest["config"]:
            raise ConfigError(f"--also {d}: not a conversion of {model.directory}'s model")
        kind = other.layout.quant_name
        if f"all-{kind}" in out or kind == model.layout.quant_name:
            raise ConfigError(f"--also {d}: a second {kind} conversion")
        out[f"all-{kind}"] = d
    return out


def _ratio_of(rows: dict[str, dict[str, Any]], a: str, b: str, key: str) -> float | None:
    x, y = rows.get(a, {}).get(key), rows.get(b, {}).get(key)
    return round(x / y, 3) if x and y else None


def _source_dir(model) -> Path | None:
    description = model.manifest.get("source", {}).get("description", "")
    prefix = "Hugging Face directory "
    if description.startswith(prefix) and Path(description[len(prefix) :]).is_dir():
        return Path(description[len(prefix) :])
    return None


def machine() -> str:

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB DRAM, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
