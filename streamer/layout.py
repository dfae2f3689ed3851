"""The on-flash layout of a converted model, and the source that reads it.

A converted model directory holds:

- `resident.safetensors`: what stays in DRAM for good (embeddings, attention, norms, LM head, FFN
  biases): the paper's selective persistence;
- `ffn.bin`: every layer's FFN as neuron bundles. Bundle i of layer l is one record holding what
  neuron i needs, part after part (Llama: gate row i, up row i, down column i; OPT and Falcon:
  up, down), each `d_model` values in the bundle's kind (`streamer.blocks`: a float dtype, or
  GGUF's 8- and 4-bit blocks), padded to `stride` bytes, a multiple of RECORD_ALIGN, so that
  every record starts on a device block and can be read with O_DIRECT into an aligned buffer.
  Layers follow each other; layer l's region starts at `layers[l].offset`;
- `manifest.json`: the architecture, dtype, record layout, offsets, file sizes, a format version
  and a SHA-256 per layer region (checked by `streamer verify`);
- `tokenizer.json` and `tokenizer_config.json` when the source had a tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from safetensors import SafetensorError, safe_open

from streamer import kernels
from streamer.blocks import FLOAT_KIND, Kind, dequantize, quantize
from streamer.blocks import kind as bundle_kind
from streamer.config import ModelConfig
from streamer.errors import ConfigError, ModelFormatError
from streamer.flash import SECTOR
from streamer.model import FFNWeights
from streamer.sources import ffn_from_resident, resident_names
from streamer.tokenizer import TokenizerSpec

FORMAT = "streamer-flash"
FORMAT_VERSION = 3  # 2: ffn.sums, a checksum per bundle; 3: quantized kinds, 512-byte records
MANIFEST = "manifest.json"
RESIDENT_FILE = "resident.safetensors"
FFN_FILE = "ffn.bin"
SUMS_FILE = "ffn.sums"  # xxh3-64 of each bundle's record (without padding), uint64 [layers, n]
RECORD_ALIGN = SECTOR  # records are padded to a multiple of this

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelFormatError(f"dtype {name!r} is not supported (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclass(frozen=True)
class BundleLayout:
    """Where neuron bundles sit in `ffn.bin` and how a record splits into its parts."""

    parts: tuple[str, ...]  # ("gate", "up", "down") or ("up", "down")
    d_model: int
    dtype: torch.dtype  # what the FFN math runs in: a float kind's own dtype, else float32
    n_neurons: int
    stride: int  # bytes per record, a multiple of RECORD_ALIGN
    layer_offsets: tuple[int, ...]
    kind: Kind  # the parts' kind
    down_kind: Kind  # the down part's (the same unless asked otherwise)

    @classmethod
    def for_config(
        cls,
        cfg: ModelConfig,
        dtype: torch.dtype,
        quant: str | None = None,
        quant_down: str | None = None,
    ) -> BundleLayout:
        """quant: the bundles' kind (`streamer.blocks.KINDS`); None: the float kind of dtype.
        quant_down: the down part's, when it differs. ConfigError when a kind is unknown or its
        blocks do not divide d_model."""
        k = bundle_kind(quant or FLOAT_KIND[dtype_name(dtype)])
        kd = k if quant_down is None else bundle_kind(quant_down)
        parts = ("gate", "up", "down") if cfg.gated else ("up", "down")
        what = "hidden size (d_model)"
        record = sum((kd if p == "down" else k).row_bytes(cfg.d_model, what) for p in parts)
        stride = -(-record // RECORD_ALIGN) * RECORD_ALIGN
        offsets = tuple(i * cfg.d_ffn * stride for i in range(cfg.n_layers))
        same_float = k == kd and not k.quantized
        compute = k.float_dtype if same_float else torch.float32
        return cls(parts, cfg.d_model, compute, cfg.d_ffn, stride, offsets, k, kd)

    @property
    def quant_name(self) -> str:
        """The kind's name, with down's after a slash where it differs: "q4_1/q8_0"."""
        same = self.down_kind == self.kind
        return self.kind.name if same else f"{self.kind.name}/{self.down_kind.name}"

    @property
    def dequantized(self) -> bool:
        """Whether computing on records needs float copies (not views) of them."""
        return self.kind.quantized or self.down_kind != self.kind

    @property
    def part_kinds(self) -> tuple[Kind, ...]:
        return tuple(self.down_kind if p == "down" else self.kind for p in self.parts)

    @property
    def part_spans(self) -> tuple[tuple[int, int], ...]:
        """Each part's first and end byte in a record."""
        spans, at = [], 0
        for k in self.part_kinds:
            spans.append((at, at + k.row_bytes(self.d_model)))
            at = spans[-1][1]
        return tuple(spans)

    @property
    def record_bytes(self) -> int:
        return self.part_spans[-1][1]

    @property
    def layer_bytes(self) -> int:
        return self.n_neurons * self.stride

    @property
    def file_bytes(self) -> int:
        return len(self.layer_offsets) * self.layer_bytes

    def offset(self, layer: int, neuron: int) -> int:
        return self.layer_offsets[layer] + neuron * self.stride

    def pack(self, w: FFNWeights, raw: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """One layer's matrices into records: [n_neurons, stride] bytes. `raw`: parts already
        in the bundle's kind (a GGUF file's own blocks), copied instead of quantized."""
        d, n = self.d_model, self.n_neurons
        rec = np.zeros((n, self.stride), dtype=np.uint8)
        for part, k, (a, b) in zip(self.parts, self.part_kinds, self.part_spans, strict=True):
            if raw is not None and part in raw:
                rec[:, a:b] = raw[part]
                continue
            m = getattr(w, part)
            if m is None or tuple(m.shape) != (n, d):
                raise ModelFormatError(
                    f"FFN {part} has shape {None if m is None else tuple(m.shape)}"
                    f", expected {(n, d)}"
                )
            rec[:, a:b] = quantize(m, k)
        return torch.from_numpy(rec)

    def unpack(self, records: torch.Tensor) -> dict[str, torch.Tensor]:
        """records: [k, stride] bytes -> {part: [k, d]} in `dtype`: views of the records for
        one float kind, dequantized copies otherwise."""
        d = self.d_model
        if not self.dequantized:
            rows = records.view(self.dtype)
            return {part: rows[:, j * d : (j + 1) * d] for j, part in enumerate(self.parts)}
        k = records.shape[0]
        return {
            part: dequantize(records[:, a:b], kind, torch.empty(k, d))
            for part, kind, (a, b) in zip(self.parts, self.part_kinds, self.part_spans, strict=True)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "parts": list(self.parts),
            "d_model": self.d_model,
            "quant": self.kind.name,
            "quant_down": self.down_kind.name,
            "n_neurons": self.n_neurons,
            "record_bytes": self.record_bytes,
            "stride": self.stride,
            "alignment": RECORD_ALIGN,
        }


def sha256_file(
    path: Path, offset: int = 0, length: int | None = None, chunk: int = 8 << 20
) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = os.path.getsize(path) - offset if length is None else length
        while left > 0:
            block = f.read(min(chunk, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(
            f"{directory}: no {MANIFEST} (not a converted model; run `streamer convert` first)"
        ) from None
    except ValueError as e:
        raise ModelFormatError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ModelFormatError(f"{path}: not a {FORMAT} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{path}: format version {m.get('format_version')!r}; this engine "
            f"reads version {FORMAT_VERSION} (convert the model again)"
        )
    for name, kind in MANIFEST_FIELDS.items():
        _manifest_field(path, m, name, kind)
    for i, layer in enumerate(m["layers"]):
        for name, kind in LAYER_FIELDS.items():
            _manifest_field(path, layer, name, kind, f"layers[{i}].")
    return m


# What the engine and `verify` read from a manifest, with its JSON type: checked when a model
# is opened, so that a damaged manifest is one line naming the field.
MANIFEST_FIELDS: dict[str, type] = {
    "source": dict,
    "source.fingerprint": str,
    "config": dict,
    "dtype": str,
    "bundle": dict,
    "layers": list,
    "resident": dict,
    "resident.bytes": int,
    "resident.sha256": str,
    "sums": dict,
    "sums.sha256": str,
}
LAYER_FIELDS: dict[str, type] = {"offset": int, "bytes": int, "sha256": str}


def _manifest_field(path: Path, m: Any, name: str, kind: type, prefix: str = "") -> None:
    value = m
    for key in name.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ModelFormatError(f"{path}: the field {prefix}{name} is missing")
        value = value[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelFormatError(
            f"{path}: the field {prefix}{name} must be a JSON {_JSON_NAMES[kind]}, "
            f"got {value!r:.40}"
        )


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer"}


class ConvertedModel:
    """A converted model directory as a `Source` (the engine's native format)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.manifest = m = read_manifest(self.directory)
        try:
            self.config = ModelConfig.from_dict(m["config"])
            self.dtype = parse_dtype(m["dtype"])  # the resident part's
            quant, down = m["bundle"].get("quant"), m["bundle"].get("quant_down")
            if not isinstance(quant, str) or not isinstance(down, str):
                raise ModelFormatError(
                    f"{self.directory / MANIFEST}: bundle.quant or bundle.quant_down is missing"
                )
            try:
                self.layout = BundleLayout.for_config(self.config, self.dtype, quant, down)
            except ConfigError as e:
                raise ModelFormatError(f"{self.directory / MANIFEST}: {e}") from None
            expected = self.layout.to_dict()
            if m["bundle"] != expected:
                raise ModelFormatError(
                    f"{self.directory}: bundle layout {m['bundle']} does not "
                    f"match the config (expected {expected})"
                )
            offsets = tuple(layer["offset"] for layer in m["layers"])
        except (KeyError, TypeError) as e:
            raise ModelFormatError(
                f"{self.directory / MANIFEST}: missing or bad field {e}"
            ) from None
        if offsets != self.layout.layer_offsets:
            raise ModelFormatError(
                f"{self.directory / MANIFEST}: layer offsets do not match the bundle layout"
            )
        for name, size in (
            (FFN_FILE, self.layout.file_bytes),
            (RESIDENT_FILE, m["resident"]["bytes"]),
            (SUMS_FILE, self.config.n_layers * self.layout.n_neurons * 8),
        ):
            path = self.directory / name
            actual = path.stat().st_size if path.exists() else None
            if actual != size:
                raise ModelFormatError(
                    f"{path}: {'missing' if actual is None else actual} bytes, "
                    f"manifest says {size} (truncated or replaced; run "
                    "`streamer verify`)"
                )
        self.ffn_path = self.directory / FFN_FILE
        self.sums = BundleSums.load(self.directory / SUMS_FILE, self.layout, self.config.n_layers)
        # What a DRAM budget's percentage is of: the weights, without the bundles' padding.
        ffn_bytes = self.config.n_layers * self.config.d_ffn * self.layout.record_bytes
        self.model_bytes = m["resident"]["bytes"] + ffn_bytes
        self.description = f"converted model {self.directory}"
        self._resident = None

    def _resident_file(self):
        if self._resident is None:
            try:
                self._resident = safe_open(str(self.directory / RESIDENT_FILE), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ModelFormatError(f"{self.directory / RESIDENT_FILE}: {e}") from None
        return self._resident

    def resident_names(self) -> list[str]:
        return resident_names(self.config)

    def resident(self, name: str) -> torch.Tensor:
        return self._resident_file().get_tensor(name)

    def read_layer(self, layer: int) -> torch.Tensor:
        """A whole layer's records, buffered read: [n_neurons, stride] bytes."""
        lay = self.layout
        arr = np.fromfile(
            self.ffn_path, dtype=np.uint8, count=lay.layer_bytes, offset=lay.layer_offsets[layer]
        )
        records = torch.from_numpy(arr).view(lay.n_neurons, lay.stride)
        self.sums.check(layer, None, records)
        return records

    def ffn(self, layer: int) -> FFNWeights:
        parts = self.layout.unpack(self.read_layer(layer))
        return ffn_from_resident(
            self.resident,
            self.config,
            layer,
            up=parts["up"],
            down=parts["down"],
            gate=parts.get("gate"),
        )

    def tokenizer(self) -> TokenizerSpec | None:
        return TokenizerSpec.from_hf_dir(self.directory)


def record_selection(directory: Path, files: tuple[str, ...]) -> None:
    """Note in the manifest the files calibration wrote, with their sha256 (replacing what an
    earlier calibration noted), so that `verify` and loading find them missing or changed."""
    m = read_manifest(directory)
    m["selection"] = {name: sha256_file(directory / name) for name in files}
    tmp = directory / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(m, indent=1))
    os.replace(tmp, directory / MANIFEST)


def selection_problems(directory: Path, manifest: dict[str, Any]) -> list[str]:
    """The calibration files the manifest notes that are missing or changed."""
    problems = []
    for name, digest in manifest.get("selection", {}).items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing (calibrate the model again)")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: checksum mismatch (calibrate the model again)")
    return problems


class CorruptData(ModelFormatError):
    """Bytes read from flash that do not match their checksum."""


@dataclass
class BundleSums:
    """Each bundle's checksum (xxh3-64 of its record, without the padding), written by the
    converter and checked on every read: corrupt flash is an error naming the layer and the
    neuron, never output. Hand-written around `xxhash` because the checks run per bundle on
    the read path, where a library call per bundle is the whole cost."""

    sums: np.ndarray  # uint64 [n_layers, n_neurons]
    record_bytes: int
    stride: int

    @classmethod
    def of_layer(cls, layout: BundleLayout, records: np.ndarray) -> np.ndarray:
        """A layer's records [n, stride] (uint8) -> their checksums [n] (uint64)."""
        rb = layout.record_bytes
        return np.fromiter(
            (xxhash.xxh3_64_intdigest(row[:rb]) for row in records), np.uint64, len(records)
        )

    @classmethod
    def load(cls, path: Path, layout: BundleLayout, n_layers: int) -> BundleSums:
        sums = np.fromfile(path, dtype="<u8").reshape(n_layers, layout.n_neurons)
        return cls(sums, layout.record_bytes, layout.stride)

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes

    @property
    def checked_in_flight(self) -> bool:
        """Whether the compiled reader can check these bundles as they land (`kernels`)."""
        return self.record_bytes > kernels.LONG_INPUT and kernels.checksums() is not None

    def check(
        self,
        layer: int,
        ids: np.ndarray | None,
        rows: torch.Tensor,
        at: np.ndarray | None = None,
    ) -> None:
        """rows[at[i]] (default rows[i]) holds the bundle of neuron ids[i] of `layer` (ids
        None: every neuron of the layer, in order), as read; CorruptData if any does not match
        its checksum."""
        ids = np.arange(self.sums.shape[1]) if ids is None else np.asarray(ids)
        if len(ids) == 0:
            return
        lib = kernels.checksums() if self.record_bytes > kernels.LONG_INPUT else None
        if lib is not None:
            assert rows.is_contiguous() and rows.shape[-1] * rows.element_size() == self.stride
            want = np.ascontiguousarray(self.sums[layer][ids])
            where = None if at is None else np.ascontiguousarray(at, dtype=np.int64)
            if where is not None and len(where) and (where.min() < 0 or where.max() >= len(rows)):
                raise IndexError("checked rows outside the rows given")
            if where is None and len(ids) > len(rows):
                raise IndexError("more bundles to check than rows given")
            bad = lib.first_mismatch(
                rows.data_ptr(),
                self.stride,
                None if where is None else where.ctypes.data,
                len(ids),
                self.record_bytes,
                want.ctypes.data,
                max(1, torch.get_num_threads()),
            )
            if bad >= 0:
                raise corrupt(layer, int(ids[bad]))
            return
        data = memoryview(rows.numpy()).cast("B")
        rb, stride = self.record_bytes, self.stride
        want = self.sums[layer][ids].tolist()
        starts = (
            range(0, len(want) * stride, stride)
            if at is None
            else (np.asarray(at) * stride).tolist()
        )
        digest = xxhash.xxh3_64_intdigest
        for i, (start, expected) in enumerate(zip(starts, want, strict=True)):
            if digest(data[start : start + rb]) != expected:
                raise corrupt(layer, int(ids[i]))


def corrupt(layer: int, neuron: int) -> CorruptData:
    return CorruptData(
        f"{FFN_FILE}: layer {layer} neuron {neuron} does not match its checksum: the data on "
        "flash is corrupt (run `streamer verify`, then convert again)"
    )
