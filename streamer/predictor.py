"""Low-rank activation predictors: which FFN neurons a token will need, before reading them.

Per layer, Linear(d, r) -> Linear(r, n_ffn) -> sigmoid on the FFN's input (the paper [3.1]);
a neuron is predicted active when its probability exceeds the layer's threshold. Two fits:
`fit_lowrank`, closed-form reduced-rank regression on a linear score (a ReLU layer's firing
pre-activation), and `train_predictor`, gradient descent on binary cross-entropy. A *look-ahead*
predictor of the same shape reads layer l's FFN input and predicts layer l+1's active set, so the
pipeline can fetch layer l+1 while layer l computes. `Predictors` holds both sets with their
thresholds and is saved beside the converted model (`predictors.safetensors` +
`predictors.json`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from streamer.errors import ConfigError, ModelFormatError
from streamer.layout import selection_problems
from streamer.ranker import META_FILE as RANKER_META
from streamer.ranker import WEIGHTS_FILE as RANKER_WEIGHTS
from streamer.ranker import GateRanker, fingerprint

WEIGHTS_FILE = "predictors.safetensors"
META_FILE = "predictors.json"


class LowRankPredictor(nn.Module):
    def __init__(self, d: int, rank: int, n: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, d] -> logits [T, n]
        return self.up(self.down(x))


def parse_ranks(spec: str, n_layers: int) -> list[int]:
    """'128' or '0-27:256,28-31:1152' -> one rank per layer (every layer must be covered)."""
    ranks: list[int | None] = [None] * n_layers
    try:
        if ":" not in spec:
            spec_rank = int(spec)
            if spec_rank < 1:
                raise ValueError
            return [spec_rank] * n_layers
        for part in spec.split(","):
            span, rank = part.split(":")
            lo, _, hi = span.partition("-")
            first, last = int(lo), int(hi or lo)
            if not 0 <= first <= last < n_layers or int(rank) < 1:
                raise ValueError
            for i in range(first, last + 1):
                ranks[i] = int(rank)
    except ValueError:
        raise ConfigError(
            f"ranks {spec!r}: expected RANK or FIRST-LAST:RANK,... with layers "
            f"in [0, {n_layers}) and ranks >= 1",
            "ranks",
        ) from None
    missing = [i for i, r in enumerate(ranks) if r is None]
    if missing:
        raise ConfigError(f"ranks {spec!r} gives no rank for layers {missing}", "ranks")
    return ranks  # type: ignore[return-value]


def train_predictor(
    x: torch.Tensor,
    y: torch.Tensor,
    rank: int,
    epochs: int = 30,
    batch: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
) -> LowRankPredictor:
    """Fit one predictor: x [N, d] float -> y [N, n] bool, balanced binary cross-entropy.

    Positives are weighted by the negatives-to-positives ratio, so a sparse layer (97% zeros)
    does not learn to predict "nothing active"."""
    torch.manual_seed(seed)
    n_samples, d = x.shape
    # Trained on standardized inputs, folded back into the weights at the end. A deep layer's
    # input is mostly a direction shared by all tokens (each layer adds to the residual stream
    # what attention averages over the context) and varies little around it, which gradient
    # descent on the raw input hardly sees.
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    pred = LowRankPredictor(d, rank, y.shape[1])
    with torch.no_grad():  # start from each neuron's base rate
        rate = y.float().mean(0).clamp(1e-4, 1 - 1e-4)
        pred.up.bias.copy_(torch.log(rate / (1 - rate)))
    p = y.float().mean().clamp(1e-4, 1 - 1e-4).item()
    pos_weight = torch.tensor(min(max((1 - p) / p, 1.0), 50.0))
    opt = torch.optim.Adam(pred.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for g in opt.param_groups:  # cosine decay
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        order = torch.randperm(n_samples, generator=gen)
        for i in range(0, n_samples, batch):
            idx = order[i : i + batch]
            loss = F.binary_cross_entropy_with_logits(
                pred(x[idx]), y[idx].float(), pos_weight=pos_weight
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():  # down((x - mean) / std) = (down / std)(x) - (down / std)(mean)
        pred.down.weight.div_(std)
        pred.up.bias.sub_(pred.up.weight @ (pred.down.weight @ mean))
    return pred.eval()


def fit_lowrank(
    x: torch.Tensor,
    z: torch.Tensor,
    rank: int,
    cut: float = 0.0,
    coef: torch.Tensor | None = None,
    ridge: float = 1e-3,
) -> LowRankPredictor:
    """Fit a predictor in closed form to a linear score: x [N, d] -> z [N, n], a neuron being
    active when z > cut (a ReLU model's pre-activation, cut 0).

    Reduced-rank regression: the least-squares map from x to z (`coef` [d, n] when z is known
    to be exactly linear in x, as a layer's own pre-activation is) restricted to the `rank`
    directions of z it explains best on this data. The logit is the predicted margin over each
    neuron's residual spread, so sigmoid(logit) ≈ P(z > cut | x) under Gaussian residuals (the
    logistic approximation of the normal CDF, factor 1.702)."""
    x, z = x.float(), z.float()
    mx, mz = x.mean(0), z.mean(0)
    xc, zc = x - mx, z - mz
    if coef is None:
        gram = xc.T @ xc
        gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-12))
        coef = torch.linalg.solve(gram, xc.T @ zc)  # [d, n]
        fitted = xc @ coef  # [N, n]
    else:
        fitted = zc  # exactly xc @ coef
    rank = min(rank, *fitted.shape)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(0)  # svd_lowrank's random projection: the same fit every run
        _, _, v = torch.svd_lowrank(fitted, q=rank, niter=4)  # v: [n, r]
    del fitted
    down = (coef.float() @ v).T  # [r, d]
    spread = (zc - (xc @ down.T) @ v.T).std(0).clamp_min(1e-6)  # [n]
    scale = 1.702 / spread
    pred = LowRankPredictor(x.shape[1], v.shape[1], z.shape[1])
    with torch.no_grad():
        pred.down.weight.copy_(down)
        pred.up.weight.copy_(v * scale[:, None])
        pred.up.bias.copy_(scale * (mz - v @ (down @ mx) - cut))
    return pred.eval()


def pick_threshold(
    probs: torch.Tensor, y: torch.Tensor, target_recall: float, mass: torch.Tensor | None = None
) -> float:
    """The highest probability threshold that keeps `target_recall` of the active neurons, or,
    given `mass` (|activation| per entry), of the active neurons' activation mass: what a
    missed neuron costs is its contribution to the FFN's output."""
    pos = probs[y].float()
    if pos.numel() == 0:
        return 0.5
    weight = torch.ones_like(pos) if mass is None else mass[y].float()
    order = torch.argsort(pos)
    missed = torch.cumsum(weight[order], 0) / weight.sum()  # mass below each candidate
    k = int(torch.searchsorted(missed, torch.tensor(1 - target_recall)).item())
    threshold = pos[order][min(k, len(pos) - 1)].item()
    return float(min(max(threshold - 1e-6, 1e-4), 0.99))


def recall_precision(
    pred: torch.Tensor, y: torch.Tensor, mass: torch.Tensor | None = None
) -> tuple[float, float, float]:
    """Recall and precision by count, and recall by activation mass (1.0 without `mass`)."""
    tp = (pred & y).sum().item()
    mass_recall = 1.0
    if mass is not None:
        m = mass.float() * y
        mass_recall = (m * pred).sum().item() / max(m.sum().item(), 1e-12)
    return tp / max(y.sum().item(), 1), tp / max(pred.sum().item(), 1), mass_recall


def _predict(p: LowRankPredictor, threshold: float, x: torch.Tensor) -> np.ndarray:
    logits = p(x.to(p.up.weight.dtype))[0].float()
    cut = math.log(threshold / (1 - threshold))
    return torch.nonzero(logits > cut).flatten().numpy()


@dataclass
class Predictors:
    """Per layer: the predictor, its threshold, the activity threshold that defines "active",
    and the look-ahead predictor of the next layer (None for the last layer)."""

    layers: list[LowRankPredictor]
    thresholds: list[float]
    activity: list[float]  # |act| > activity[l] is "active" (0 for ReLU: output > 0)
    lookahead: list[LowRankPredictor | None]
    lookahead_thresholds: list[float]
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, dtype: torch.dtype) -> Predictors:
        for p in [*self.layers, *[q for q in self.lookahead if q is not None]]:
            p.to(dtype)
        return self

    @property
    def nbytes(self) -> int:
        preds = [*self.layers, *[q for q in self.lookahead if q is not None]]
        return sum(t.numel() * t.element_size() for p in preds for t in p.parameters())

    @torch.inference_mode()
    def predict(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """x: [1, d] (the FFN input) -> sorted ids of the neurons predicted active."""
        return _predict(self.layers[layer], self.thresholds[layer], x)

    @torch.inference_mode()
    def predict_next(
        self, layer: int, x: torch.Tensor, min_probability: float = 0.0
    ) -> np.ndarray | None:
        """Layer `layer`'s FFN input -> the neurons of layer + 1 likely active (None: no
        look-ahead predictor for this layer). `min_probability` raises the layer's threshold:
        what the look-ahead leaves out, the layer's own predictor still asks for."""
        p = self.lookahead[layer] if layer < len(self.lookahead) else None
        if p is None:
            return None
        return _predict(p, max(self.lookahead_thresholds[layer], min_probability), x)

    def save(self, directory: Path) -> None:

        tensors = {}
        for kind, preds in (("layers", self.layers), ("lookahead", self.lookahead)):
            for i, p in enumerate(preds):
                if p is not None:
                    for name, t in p.state_dict().items():
                        tensors[f"{kind}.{i}.{name}"] = t.contiguous()
        save_file(tensors, str(directory / WEIGHTS_FILE))
        meta = {
            **self.meta,
            "thresholds": self.thresholds,
            "activity": self.activity,
            "lookahead_thresholds": self.lookahead_thresholds,
            "ranks": [p.down.out_features for p in self.layers],
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(
        cls, directory: Path, d: int, n: int, n_layers: int, lookahead: bool = True
    ) -> Predictors:

        if not (directory / META_FILE).is_file():
            raise ModelFormatError(
                f"{directory} has no predictors: run `streamer calibrate` on it first"
            )
        try:
            meta = json.loads((directory / META_FILE).read_text())
            tensors = load_file(str(directory / WEIGHTS_FILE))
            ranks = meta["ranks"]
            if len(ranks) != n_layers or len(meta["thresholds"]) != n_layers:
                raise ModelFormatError(
                    f"{directory / META_FILE}: {len(ranks)} layers, the model has {n_layers}"
                )

            def build(kind: str, i: int) -> LowRankPredictor | None:
                if f"{kind}.{i}.down.weight" not in tensors:
                    return None
                p = LowRankPredictor(d, ranks[i], n)
                p.load_state_dict({k: tensors[f"{kind}.{i}.{k}"] for k in p.state_dict()})
                return p.eval()

            layers = [build("layers", i) for i in range(n_layers)]
            if any(p is None for p in layers):
                raise ModelFormatError(f"{directory / WEIGHTS_FILE} lacks a layer's predictor")
            return cls(
                layers,
                meta["thresholds"],
                meta["activity"],  # type: ignore[arg-type]
                [build("lookahead", i) if lookahead else None for i in range(n_layers)],
                meta["lookahead_thresholds"],
                meta,
            )
        except (KeyError, RuntimeError, OSError, ValueError) as e:
            raise ModelFormatError(f"{directory}: predictors cannot be read ({e})") from None


Selection = Predictors | GateRanker  # predict(layer, x), predict_next, activity, nbytes


def selection_file(directory: Path) -> Path | None:
    """The weights file of the selection calibrated for the model in `directory` (the gated
    ranker's, else the low-rank predictors'), None when it has none."""
    for meta, weights in ((RANKER_META, RANKER_WEIGHTS), (META_FILE, WEIGHTS_FILE)):
        if (directory / meta).is_file():
            return directory / weights
    return None


def load_selection(
    directory: Path, cfg, manifest: dict[str, Any], lookahead: bool = True
) -> Selection:
    """What `streamer calibrate` wrote for the model in `directory`: the gated ranker (checked
    against the model's fingerprint) or the low-rank predictors."""
    problems = selection_problems(directory, manifest)
    if problems:
        raise ModelFormatError(f"{directory}: {problems[0]}")
    if (directory / RANKER_META).is_file():
        return GateRanker.load(
            directory, cfg.d_model, cfg.d_ffn, cfg.n_layers, fingerprint(manifest)
        )
    return Predictors.load(directory, cfg.d_model, cfg.d_ffn, cfg.n_layers, lookahead)


def selection_activity(directory: Path) -> list[float]:
    """Each layer's threshold on |activation| that says "active" (what a prompt's window is
    filled with), without loading the selection's weights."""
    for meta_file, key in ((RANKER_META, "thresholds"), (META_FILE, "activity")):
        if (directory / meta_file).is_file():
            try:
                return [float(a) for a in json.loads((directory / meta_file).read_text())[key]]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelFormatError(f"{directory / meta_file}: unreadable ({e})") from None
    raise ModelFormatError(f"{directory} has no predictors: run `streamer calibrate` on it first")
