"""The gated FFN's selection: a 4-bit copy of every layer's gate and up projections, kept in
DRAM, ranks the neurons before any of their bundles is read.

A SwiGLU (or GeGLU) neuron's output is act(gate·x) * (up·x); no small predictor guesses it well
(the low-rank ones had to keep nearly every neuron; README, "Gated models"). This computes it: both
projections quantized to 4 bits in groups of 32 input channels, each group with a scale and an
offset (GGUF's Q4_1 blocks: for a model converted from Q4_1, as the default model is, the copy
holds the very weights, up to bfloat16 rounding of the scales), multiplied with torch's int4
weight-only kernel. A neuron is selected when its estimated |output| exceeds the layer's
threshold, which calibration sets from calibration text for a target sparsity. Then the exact
bundles of the selected neurons are read and computed: the copy chooses, it never computes the
output. Look-ahead (the pipeline's prefetch of layer l+1 while layer l computes): layer l+1's
copy applied to layer l's FFN input, with its own calibrated threshold.

Saved beside the converted model as `ranker.safetensors` (the portable form: nibbles, scales,
offsets) and `ranker.json` (thresholds, the model it belongs to, the calibration report).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from streamer.errors import ModelFormatError
from streamer.model import ACTIVATION_FNS, FFNWeights
from streamer.quant import GROUP, Q4Matrix, quantize

WEIGHTS_FILE = "ranker.safetensors"
META_FILE = "ranker.json"


def supports(d_model: int) -> bool:
    return d_model % GROUP == 0


class LayerRanker:
    """One layer's 4-bit gate and up, packed for torch's CPU int4 kernel."""

    def __init__(self, q: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        self.n = q["codes"].shape[0] // 2  # rows: the gate's n, then the up's n
        self.matrix = Q4Matrix(q)
        self.bias = bias  # [2n] float32: the gate's biases, then the up's; None: no biases

    @property
    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.numel() * 4
        return self.matrix.nbytes + extra

    def scores(self, x: torch.Tensor, act) -> torch.Tensor:
        """x [T, d] -> estimated |act(gate·x) * (up·x)| [T, n] (float32)."""
        y = self.matrix.linear(x).float()
        if self.bias is not None:
            y = y + self.bias
        return (act(y[:, : self.n]) * y[:, self.n :]).abs_()


@dataclass
class GateRanker:
    """Per layer: the ranker, the threshold its score must exceed (negative: every neuron), the
    look-ahead threshold (layer l+1's ranker on layer l's input; None for the last layer).
    `activity` is what "active" means for the window a prompt fills (|output| above the same
    thresholds)."""

    layers: list[LayerRanker]
    thresholds: list[float]
    lookahead_thresholds: list[float | None]
    activation: str
    meta: dict[str, Any] = field(default_factory=dict)
    # the portable codes, kept by `build` for `save` (calibration); a loaded ranker holds only
    # the kernel's packed copy
    quantized: list[dict[str, torch.Tensor]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.act = ACTIVATION_FNS[self.activation]
        self.gap = int(self.meta.get("gap", 0))

    @classmethod
    def build(cls, weights: list[FFNWeights], activation: str) -> GateRanker:
        """Quantize each layer's gate and up; thresholds all 0 until calibration sets them."""
        quantized, layers = [], []
        for w in weights:
            if w.gate is None:
                raise ModelFormatError("the gated ranker needs a gated FFN (gate and up)")
            q = quantize(torch.cat([w.gate, w.up]))
            quantized.append(q)
            bias = None
            if w.gate_bias is not None or w.up_bias is not None:
                zeros = torch.zeros(w.up.shape[0])
                bias = torch.cat(
                    [zeros if b is None else b.float() for b in (w.gate_bias, w.up_bias)]
                )
            layers.append(LayerRanker(q, bias))
        n = len(layers)
        return cls(layers, [0.0] * n, [None] * n, activation, quantized=quantized)

    @property
    def activity(self) -> list[float]:
        return self.thresholds

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.layers)

    def to(self, dtype: torch.dtype) -> GateRanker:
        return self  # the copy is 4-bit whatever the compute dtype; scores are float32

    def scores(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.layers[layer].scores(x, self.act)

    @torch.inference_mode()
    def predict(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """x: [1, d] (the FFN input) -> sorted ids of the neurons selected."""
        return select(self.scores(layer, x)[0], self.thresholds[layer], self.gap)

    @torch.inference_mode()
    def predict_next(
        self, layer: int, x: torch.Tensor, min_probability: float = 0.0
    ) -> np.ndarray | None:
        """Layer `layer`'s FFN input -> the neurons of layer + 1 likely selected (None for the
        last layer). `min_probability` is the low-rank predictors' knob; a ranker's look-ahead
        threshold is calibrated instead, so it is not used."""
        thr = self.lookahead_thresholds[layer] if layer + 1 < len(self.layers) else None
        if thr is None:
            return None
        return select(self.scores(layer + 1, x)[0], thr, self.gap)

    def save(self, directory: Path, fingerprint: str) -> None:
        tensors = {
            f"layers.{i}.{k}": t.contiguous()
            for i, q in enumerate(self.quantized)
            for k, t in q.items()
        }
        for i, r in enumerate(self.layers):
            if r.bias is not None:
                tensors[f"layers.{i}.bias"] = r.bias
        save_file(tensors, str(directory / WEIGHTS_FILE))
        meta = {
            **self.meta,
            "kind": "gated-ranker",
            "model": fingerprint,
            "activation": self.activation,
            "group": GROUP,
            "thresholds": self.thresholds,
            "lookahead_thresholds": self.lookahead_thresholds,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path, d: int, n: int, n_layers: int, fingerprint: str) -> GateRanker:
        """The ranker saved in `directory`, checked against the model it is loaded for."""
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError, SafetensorError) as e:
            raise ModelFormatError(f"{directory}: the ranker cannot be read ({e})") from None
        if not isinstance(meta, dict) or meta.get("kind") != "gated-ranker":
            raise ModelFormatError(f"{meta_path} is not a gated ranker's file")
        if meta.get("model") != fingerprint:
            raise ModelFormatError(
                f"{meta_path} was calibrated for another model ({meta.get('model')!r}; this is "
                f"{fingerprint!r}): run `streamer calibrate` on this one"
            )
        thr, look = meta.get("thresholds"), meta.get("lookahead_thresholds")
        if not isinstance(thr, list) or not isinstance(look, list):
            raise ModelFormatError(f"{meta_path}: thresholds missing")
        if len(thr) != n_layers or len(look) != n_layers:
            raise ModelFormatError(
                f"{meta_path}: {len(thr)} layers of thresholds, the model has {n_layers}"
            )
        if not all(isinstance(t, (int, float)) for t in thr):
            raise ModelFormatError(f"{meta_path}: thresholds must be numbers")
        layers = []
        shapes = {
            "codes": (2 * n, d // 2),
            "scale": (2 * n, d // GROUP),
            "low": (2 * n, d // GROUP),
        }
        for i in range(n_layers):
            q = {k: tensors.get(f"layers.{i}.{k}") for k in shapes}
            for k, shape in shapes.items():
                if q[k] is None or tuple(q[k].shape) != shape:
                    got = None if q[k] is None else tuple(q[k].shape)
                    raise ModelFormatError(
                        f"{directory / WEIGHTS_FILE}: layer {i} {k} has shape {got}, "
                        f"expected {shape}"
                    )
            layers.append(LayerRanker(q, tensors.get(f"layers.{i}.bias")))  # type: ignore[arg-type]
            for k in shapes:  # only the packed copy stays in DRAM
                del tensors[f"layers.{i}.{k}"]
        return cls(
            layers,
            [float(t) for t in thr],
            [None if t is None else float(t) for t in look],
            meta.get("activation", "silu"),
            meta,
        )


def select(score: torch.Tensor, threshold: float, gap: int = 0) -> np.ndarray:
    """Sorted ids of the neurons whose score exceeds `threshold`, and of every run of at most
    `gap` neurons between two of them: their bundles lie between, so one longer read replaces
    two, and each read costs more here than its bytes do (README, "Gated models"). A neuron
    added is computed like the others: more neurons only bring the output nearer dense."""
    ids = torch.nonzero(score > threshold).flatten().numpy()
    if gap <= 0 or len(ids) < 2:
        return ids
    d = np.diff(ids)
    small = (d > 1) & (d <= gap + 1)
    if not small.any():
        return ids
    delta = np.zeros(len(score) + 1, dtype=np.int32)
    delta[ids[:-1][small] + 1] += 1  # the runs between: no two overlap
    delta[ids[1:][small]] -= 1
    keep = np.cumsum(delta[:-1]) > 0
    keep[ids] = True
    return np.flatnonzero(keep)


def fingerprint(manifest: dict[str, Any]) -> str:
    """What ties a ranker to its model: the source's fingerprint and the FFN region's checksums."""
    source = manifest.get("source", {}).get("fingerprint", "")
    layers = [layer.get("sha256", "") for layer in manifest.get("layers", [])]
    return f"{source}:{hashlib.sha256(''.join(layers).encode()).hexdigest()[:16]}"
