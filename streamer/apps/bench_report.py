"""What `streamer bench` prints and draws from its report: the Markdown table and the chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PIPELINE_ROWS = ("pipeline", "serial")  # their I/O overlaps compute: drawn as the wait


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _affinity(settings: dict[str, Any]) -> str:
    cpus = settings.get("compute_cpus"), settings.get("io_cpus")
    if not any(cpus):
        return ""
    where = [c or "any" for c in cpus]
    return f"; pipeline rows: compute on CPUs {where[0]}, predictor and prefetch on {where[1]}"


def _bound(bound: dict[str, Any] | None) -> list[str]:
    if not bound:
        return []
    probed = ", ".join(
        f"{c['reads']:.0f} of {c['chunk']} B at {c['gb_per_s']:.3f} GB/s" for c in bound["classes"]
    )
    return [
        f"the disk's time for the all row's reads, probed at each size it read (per token: "
        f"{probed}): {bound['io_ms']:.1f} ms (all_vs_bound's base, with the dense row)"
    ]


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        f"`{report['model']}` (FFN {report.get('quant', '?')}): "
        f"{report['model_bytes'] / 1e9:.2f} GB, DRAM budget "
        f"{report['dram_budget'] / 1e9:.2f} GB, window {report['window']}; {report['machine']}",
        f"text: {report['text']}, {report['prompt_tokens']} tokens of prompt, then one token "
        "per step (teacher-forced)",
        f"disk probe: {report['probe']['gb_per_s']:.3f} GB/s for "
        f"{report['probe']['chunk'] // 1024} KiB reads (the bundle), "
        + (
            f"{report['probe_all']['gb_per_s']:.3f} GB/s for {report['probe_all']['chunk']} B "
            "(the all row's mean read, the io_efficiency base), "
            if "probe_all" in report
            else ""
        )
        + f"{report['probe']['concurrency']} in flight"
        + _affinity(report.get("settings", {})),
        *_bound(rows.get("all", {}).get("bound")),
        "",
        "| row | tokens | read/token | reads/token | GB/s read | I/O ms | mem ms | compute ms "
        "| total ms (mean) | median [min-max] ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |" + " |" * 8)
            continue
        lines.append(
            f"| {name} | {r['tokens']} | {r.get('bytes_read', 0) / 1e9:.3f} GB | "
            f"{_fmt(r.get('reads'), '.0f')} | {_fmt(r.get('read_gb_per_s'), '.2f')} | "
            f"{_fmt(r.get('io_ms'))} | {_fmt(r.get('mem_ms'))} | {_fmt(r.get('compute_ms'))} | "
            f"{r['total_ms']:.1f} | {r['median_ms']:.1f} [{r['min_ms']:.0f}-{r['max_ms']:.0f}] |"
        )
    lines += ["", "| ratio | measured |", "|---|---|"]
    for k, v in report["ratios"].items():
        lines.append(f"| {k} | {_fmt(v, '.3f')} |")
    split = report.get("budget_split")
    if split:
        paper = report["paper"]["falcon_7b_split"]
        lines += [
            "",
            "| DRAM split (of the model) | this run | paper, Falcon-7B |",
            "|---|---|---|",
        ]
        for k in ("embeddings", "attention", "predictors", "window", "other", "total"):
            lines.append(f"| {k} | {split[k]:.1%} | {_fmt(paper.get(k), '.1%')} |")
        lines.append(f"| window, of the FFN | {split['window_of_ffn']:.1%} | 33% |")
    return "\n".join(lines)


def chart(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Table 3's split per row as stacked bars (ms per token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows if "skipped" not in rows[n]]
    parts = {
        "I/O": [rows[n].get("io_ms", 0.0) for n in names],
        "memory management": [rows[n].get("mem_ms", 0.0) for n in names],
        "compute": [rows[n].get("compute_ms", 0.0) for n in names],
        # the peer times only its whole token: drawn as such, not as compute
        "total, not split (the peer)": [
            0.0 if "compute_ms" in rows[n] else rows[n]["total_ms"] for n in names
        ],
    }
    # The peer reports only its total; the pipeline's I/O overlaps compute (its wait is what
    # shows): draw what each row's total is made of without overlap double counting.
    for i, n in enumerate(names):
        if n in PIPELINE_ROWS:
            parts["I/O"][i] = rows[n].get("wait_ms", 0.0)
            parts["memory management"][i] = 0.0
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    left = [0.0] * len(names)
    for label, values in parts.items():
        if not any(values):
            continue
        ax.barh(names, values, left=left, label=label)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    # a log axis: naive's seconds beside the all row's milliseconds stay readable
    ax.set_xscale("log")
    if names:  # from a tenth of the fastest row: every row's first part shows
        ax.set_xlim(left=min(rows[n]["total_ms"] for n in names) / 10)
    ax.set_xlabel("ms per token (mean, log scale)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
