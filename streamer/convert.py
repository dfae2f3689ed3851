"""`streamer convert`: write a model in the on-flash layout; `streamer verify`: check one.

The converter reads any source (`streamer.sources`) one tensor and one layer at a time, writes the
resident part as safetensors and the FFN as neuron bundles (`streamer.layout`), checksums each
layer region, and writes the manifest last. It builds into a temporary sibling directory and
renames it into place, so an interrupted conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from streamer.errors import ConfigError, ModelFormatError
from streamer.gptq import DAMP, GPTQ_SETTINGS, GPTQ_TEXTS, LayerByLayer, wants_gptq
from streamer.layerwise import shipped_text
from streamer.layout import (
    FFN_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    RESIDENT_FILE,
    SUMS_FILE,
    BundleLayout,
    BundleSums,
    ConvertedModel,
    dtype_name,
    parse_dtype,
    read_manifest,
    selection_problems,
    sha256_file,
)
from streamer.sources import Source

log = logging.getLogger(__name__)


def source_fingerprint(source: Source) -> str:
    """Identifies the model a source holds: its config and its tensors' shapes and first values."""
    h = hashlib.sha256(json.dumps(source.config.to_dict(), sort_keys=True).encode())
    for name in ("embed.weight", "layers.0.attn.wq.weight"):
        t = source.resident(name)
        h.update(str(tuple(t.shape)).encode())
        h.update(t.flatten()[:4096].float().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class ConvertResult:
    directory: Path
    converted: bool  # False when OUT already held this model
    bytes_written: int
    quant: str  # the bundles' kind (`BundleLayout.quant_name`)


def convert(
    source: Source,
    out: str | os.PathLike,
    dtype: str = "float16",
    force: bool = False,
    progress: bool = True,
    quant: str | None = None,
    quant_down: str | None = None,
    gptq: str = "auto",
) -> ConvertResult:
    """dtype: the resident part's (and the bundles', unless `quant` names their kind:
    `streamer.blocks.KINDS`; `quant_down` the down part's, where it differs). gptq: "auto"
    (the default) quantizes the 4-bit parts that are not the source's own blocks by GPTQ on the
    shipped calibration text (`streamer.gptq`) where the source has a tokenizer (else, with a
    warning, to nearest); "on" insists on GPTQ; "off" rounds them to nearest. A bad kind or
    setting, or a model its blocks do not fit, is a ConfigError before anything is written."""
    out = Path(out).expanduser()
    torch_dtype = parse_dtype(dtype)
    if gptq not in GPTQ_SETTINGS:
        raise ConfigError(f"gptq must be one of {', '.join(GPTQ_SETTINGS)}, got {gptq!r}", "gptq")
    layout = BundleLayout.for_config(source.config, torch_dtype, quant, quant_down)
    own_blocks = getattr(source, "ffn_blocks", None)  # a GGUF file's blocks, kept where they fit
    # the parts every layer keeps as the file's own blocks (a file may store layers in mixed kinds)
    kept = set(layout.parts)
    for i in range(source.config.n_layers if own_blocks else 0):
        kept &= set(own_blocks(i, layout.kind))  # type: ignore[misc]
    use_gptq = gptq != "off" and wants_gptq(layout, kept if own_blocks else set())
    # a 4-bit file's gate and up put on the other 4-bit kind's grid: said, with what keeps them
    own_kinds = {k.lower() for k in getattr(source, "ffn_block_kinds", set)()}
    other_4bit = sorted(own_kinds & {"q4_0", "q4_1"} - {layout.kind.name})
    if layout.kind.name in ("q4_0", "q4_1") and not kept & {"gate", "up"} and other_4bit:
        log.warning(
            "%s stores gate and up in %s: --quant %s quantizes those 4-bit values again, onto "
            "another grid, which costs more perplexity than keeping them (--quant %s keeps the "
            'file\'s own blocks; README, "Quantized bundles")',
            source.description,
            "/".join(other_4bit),
            layout.kind.name,
            other_4bit[0],
        )
    if use_gptq and source.tokenizer() is None:
        if gptq == "on":
            raise ConfigError(
                f"{source.description} has no tokenizer, which GPTQ needs for its calibration "
                "text: give --gptq off (or auto)",
                "gptq",
            )
        log.warning(
            "%s has no tokenizer for GPTQ's calibration text: its 4-bit parts are rounded to "
            "nearest",
            source.description,
        )
        use_gptq = False
    fingerprint = source_fingerprint(source)
    remove_stale_partials(out)
    if out.exists():
        if not out.is_dir():
            raise ModelFormatError(f"{out} exists and is not a directory")
        if (out / MANIFEST).exists():
            try:
                old = read_manifest(out)
            except ModelFormatError:
                old = {}
                if older_format(out):  # our own output, from an older engine: replaced
                    log.info("%s holds an older format; converting it again", out)
                    force = True
            same = (
                old.get("source", {}).get("fingerprint") == fingerprint
                and old.get("dtype") == dtype
                and old.get("bundle", {}).get("quant") == layout.kind.name
                and old.get("bundle", {}).get("quant_down") == layout.down_kind.name
                and bool(old.get("gptq")) == use_gptq
            )
            if same and not force:
                return ConvertResult(out, False, 0, layout.quant_name)
            if not force:
                held = old.get("source", {}).get("description", "another model")
                raise ModelFormatError(
                    f"{out} already holds another model ({held}, {old.get('dtype')}, "
                    f"FFN {old.get('bundle', {}).get('quant')}); pick another directory or pass "
                    "--force to replace it"
                )
        elif any(out.iterdir()):
            raise ModelFormatError(
                f"{out} is not empty and holds no converted model; refusing to write into it"
            )
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written = _write(source, tmp, torch_dtype, layout, fingerprint, progress, use_gptq)
        if out.exists():
            # Only ever an empty directory or one of our converted models (checked above).
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ConvertResult(out, True, written, layout.quant_name)


def remove_stale_partials(out: Path) -> None:
    """Remove the partial builds of `out` that conversions left when they were killed (SIGTERM,
    SIGKILL, a reboot: their `finally` never ran) and whose process is gone: each can hold
    gigabytes, and the next conversion builds under its own pid's name."""
    for partial in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a conversion that was stopped", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        pass
    return True


def _write(
    source: Source,
    tmp: Path,
    dtype: torch.dtype,
    layout: BundleLayout,
    fingerprint: str,
    progress: bool,
    use_gptq: bool = False,
) -> int:
    cfg = source.config
    own_blocks = getattr(source, "ffn_blocks", None)  # a GGUF file's blocks, kept where they fit
    names = source.resident_names()
    by_layer = None
    if use_gptq:
        text = "\n\n".join(shipped_text(name) for name in GPTQ_TEXTS)
        tokens = source.tokenizer().build().encode(text)  # type: ignore[union-attr]
        by_layer = LayerByLayer(source, layout, tokens)
    with tqdm(
        total=len(names) + cfg.n_layers, desc="convert", unit="part", disable=not progress
    ) as bar:
        bar.set_postfix_str("resident")
        resident = {}
        for n in names:
            resident[n] = source.resident(n).to(dtype).contiguous()
            bar.update(1)
        save_file(resident, str(tmp / RESIDENT_FILE), metadata={"format": FORMAT})
        del resident
        layers, sums = [], []
        bar.set_postfix_str("ffn bundles")
        with (tmp / FFN_FILE).open("wb") as f:
            for i in range(cfg.n_layers):
                raw = own_blocks(i, layout.kind) if own_blocks else None
                w = source.ffn(i)
                if by_layer is not None:
                    records = by_layer.layer(i, w, raw or {}).numpy()
                else:
                    records = layout.pack(w, raw).numpy()
                assert f.tell() == layout.layer_offsets[i]
                f.write(memoryview(records))
                sums.append(BundleSums.of_layer(layout, records))
                layers.append(
                    {
                        "offset": layout.layer_offsets[i],
                        "n_neurons": layout.n_neurons,
                        "bytes": layout.layer_bytes,
                        "sha256": hashlib.sha256(memoryview(records)).hexdigest(),
                    }
                )
                bar.update(1)
    np.concatenate(sums).astype("<u8").tofile(tmp / SUMS_FILE)
    spec = source.tokenizer()
    if spec is not None:
        spec.save(tmp)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": {"description": source.description, "fingerprint": fingerprint},
        "config": cfg.to_dict(),
        "dtype": dtype_name(dtype),
        "bundle": layout.to_dict(),
        "ffn": {"file": FFN_FILE, "bytes": layout.file_bytes},
        "layers": layers,
        "resident": {
            "file": RESIDENT_FILE,
            "bytes": (tmp / RESIDENT_FILE).stat().st_size,
            "sha256": sha256_file(tmp / RESIDENT_FILE),
        },
        "sums": {"file": SUMS_FILE, "hash": "xxh3_64", "sha256": sha256_file(tmp / SUMS_FILE)},
        "tokenizer": spec is not None,
        # the 4-bit parts quantized by GPTQ on the shipped calibration text (streamer.gptq)
        "gptq": {"texts": list(GPTQ_TEXTS), "tokens": by_layer.tokens, "damp": DAMP}
        if by_layer is not None
        else None,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return layout.file_bytes + manifest["resident"]["bytes"]


def verify(directory: str | os.PathLike, progress: bool = True) -> list[str]:
    """Every problem found in a converted model (empty when it is intact)."""
    directory = Path(directory)
    try:
        model = ConvertedModel(directory)
    except ModelFormatError as e:
        return [str(e)]
    m, problems = model.manifest, []
    res = m["resident"]
    if sha256_file(directory / RESIDENT_FILE) != res["sha256"]:
        problems.append(f"{RESIDENT_FILE}: checksum mismatch")
    if sha256_file(directory / SUMS_FILE) != m["sums"]["sha256"]:
        problems.append(f"{SUMS_FILE}: checksum mismatch")
    for i, layer in enumerate(tqdm(m["layers"], desc="verify", unit="layer", disable=not progress)):
        if sha256_file(model.ffn_path, layer["offset"], layer["bytes"]) != layer["sha256"]:
            problems.append(
                f"{FFN_FILE}: layer {i} checksum mismatch (bytes {layer['offset']}"
                f"..{layer['offset'] + layer['bytes']})"
            )
    problems += selection_problems(directory, m)
    if m.get("tokenizer") and not (directory / "tokenizer.json").is_file():
        problems.append("tokenizer.json is missing")
    return problems


def older_format(directory: Path) -> bool:
    """Whether the directory holds this engine's conversion in an older format version."""
    try:
        m = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(m, dict)
        and m.get("format") == FORMAT
        and m.get("format_version") != FORMAT_VERSION
    )
