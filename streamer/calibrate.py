"""`streamer calibrate`: record which FFN neurons fire, train the predictors, report quality.

Runs the dense model over calibration text, records each layer's FFN input and activations,
defines "active" (ReLU: output > 0; SwiGLU: |silu(gate·x)·(up·x)| above a per-layer threshold set
for the target sparsity, magnitude thresholding as in CATS/TEAL), fits a low-rank predictor
and a look-ahead predictor per layer (ReLU models: in closed form, by reduced-rank regression on
the firing pre-activations; SwiGLU: by gradient descent on binary cross-entropy), picks each
threshold on a validation split for a target recall, and reports recall, precision and
perplexity (dense, sparse with the true active set, sparse with the predictor) on held-out text.
Everything is saved beside the converted model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from streamer.errors import ConfigError
from streamer.layerwise import LayerRun, MaskedFFN, perplexity_of, shipped_text, token_nlls
from streamer.layout import ConvertedModel, parse_dtype, record_selection
from streamer.model import DenseFFN, FFNWeights, Transformer
from streamer.predictor import META_FILE as PREDICTOR_META
from streamer.predictor import WEIGHTS_FILE as PREDICTOR_WEIGHTS
from streamer.predictor import (
    LowRankPredictor,
    Predictors,
    fit_lowrank,
    parse_ranks,
    pick_threshold,
    recall_precision,
    train_predictor,
)
from streamer.quant import GROUP
from streamer.ranker import META_FILE as RANKER_META
from streamer.ranker import WEIGHTS_FILE as RANKER_WEIGHTS
from streamer.ranker import GateRanker, select
from streamer.ranker import fingerprint as ranker_fingerprint
from streamer.ranker import supports as supports_ranker
from streamer.registry import load_tokenizer
from streamer.sources import LayerWeights

# The ranker's default sparsity, chosen by the default model's held-out perplexity (README,
# "Gated models")
RANKER_SPARSITY = 0.45


@dataclass
class CalibrationSettings:
    texts: list[Path] = field(default_factory=list)  # empty: the text shipped with streamer
    heldout: Path | None = None  # None: the held-out text shipped with streamer
    ranks: str = "128"
    # SwiGLU only: fraction of (token, neuron) pairs left out; None: RANKER_SPARSITY for the
    # ranker, 0.5 for the low-rank predictors
    sparsity: float | None = None
    target_recall: float = 0.99  # of the active neurons' activation mass
    epochs: int = 30
    max_tokens: int = 8192
    chunk: int = 256  # tokens per sequence while recording
    seed: int = 0
    batch: int = 256  # predictor training: samples per step
    lr: float = 3e-3  # Adam's, decayed to 0 by the last epoch
    dtype: str = "float32"  # the dense model's while recording (predictors train in float32)
    fit: str = "auto"  # lowrank (closed form), sgd (gradient descent), auto: lowrank for ReLU
    gap: int = 0  # the ranker's: runs of at most this many neurons between two selected join them

    def __post_init__(self) -> None:
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}", "sparsity")
        if not 0 < self.target_recall <= 1:
            raise ConfigError(f"recall must be in (0, 1], got {self.target_recall}", "recall")
        if self.epochs < 1 or self.max_tokens < 16 or self.chunk < 2:
            raise ConfigError("epochs must be >= 1 and max_tokens >= 16", "epochs")
        if self.batch < 1 or not 0 < self.lr < 1:
            raise ConfigError(
                f"batch must be >= 1 and lr in (0, 1), got {self.batch}, {self.lr}", "batch"
            )
        if self.gap < 0:
            raise ConfigError(f"gap must be at least 0, got {self.gap}", "gap")
        if self.fit not in ("auto", "lowrank", "sgd", "ranker"):
            raise ConfigError(f"fit must be auto, lowrank, sgd or ranker, got {self.fit}", "fit")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"dtype must be float32, bfloat16 or float16, got {self.dtype}", "dtype"
            )


def run_tokens(
    model: Transformer,
    tokens: list[int],
    chunk: int,
    on_logits: Callable[[torch.Tensor, list[int]], None] | None = None,
    step: int = 128,
    progress: bool = False,
) -> None:
    """Run the model over `tokens` in sequences of `chunk` (a fresh KV cache each); `progress`:
    a bar of tokens on stderr."""
    chunk = min(chunk, model.cfg.max_positions)
    bar = tqdm(total=len(tokens), desc="tokens", unit="tok", disable=not progress, leave=False)
    for i in range(0, len(tokens) - 1, chunk):
        seq = tokens[i : i + chunk]
        if len(seq) < 2:
            break
        cache = model.new_cache(len(seq))
        rows = []
        for j in range(0, len(seq), step):
            rows.append(model.forward(torch.tensor(seq[j : j + step]), cache))
            bar.update(len(seq[j : j + step]))
        if on_logits is not None:
            on_logits(torch.cat(rows), seq)


def perplexity(
    model: Transformer,
    tokens: list[int],
    chunk: int = 512,
    progress: bool = False,
    per_token: list[torch.Tensor] | None = None,
) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of each token given the ones before it in its chunk;
    `per_token`, a list, gets each chunk's tokens' negative log-likelihoods (float32)."""
    total = [0.0, 0]

    def score(logits: torch.Tensor, seq: list[int]) -> None:
        nlls = token_nlls(logits, seq)
        total[0] += nlls.sum().item()
        total[1] += len(seq) - 1
        if per_token is not None:
            per_token.append(nlls)

    run_tokens(model, tokens, chunk, score, progress=progress)
    if total[1] == 0:
        raise ConfigError("the text is too short: it needs at least 2 tokens")
    return perplexity_of(total[0], total[1]), total[1]


RESAMPLES = 10_000  # the paired bootstrap's


def paired_ratio(nlls: np.ndarray, ref: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """The perplexity ratio of two models scored on the same tokens (their per-token negative
    log-likelihoods), with its 95% interval from a paired bootstrap over the tokens: how much a
    text of this length can tell the two apart."""
    diff = np.asarray(nlls, np.float64) - np.asarray(ref, np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            diff[rng.integers(0, len(diff), (n, len(diff)))].mean(1)
            for n in np.diff(np.r_[0:RESAMPLES:1000, RESAMPLES])
        ]
    )
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(np.exp(diff.mean())), float(np.exp(lo)), float(np.exp(hi))


def _tokens(source: ConvertedModel, texts: list[str], limit: int) -> list[int]:
    tok = load_tokenizer(source)
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text)
    return ids[:limit]


def _chunks(tokens: list[int], chunk: int) -> list[list[int]]:
    seqs = [tokens[i : i + chunk] for i in range(0, len(tokens), chunk)]
    return [s for s in seqs if len(s) >= 2]


def _recorded(run: LayerRun, i: int, dense: DenseFFN, mask=None):
    """Run layer i; its FFN inputs [N, d] (float32) and activation magnitudes [N, n]."""
    xs: list[torch.Tensor] = []
    hs: list[torch.Tensor] = []

    def record(layer: int, x: torch.Tensor, h: torch.Tensor) -> None:
        xs.append(x.float())
        hs.append(h.abs().to(torch.float16))

    run.layer(i, MaskedFFN(dense, mask=mask, record=record))
    return torch.cat(xs), torch.cat(hs)


def _score(x: torch.Tensor, h: torch.Tensor, w: FFNWeights, relu: bool):
    """The score [N, n] a closed-form predictor fits, with its exact coefficients [d, n] when
    it has them: a ReLU layer's firing pre-activation (the gate's, if gated) is x·Wᵀ + b
    exactly; otherwise the activation magnitude, which no linear map gives exactly."""
    if not relu:
        return h.float(), None
    weight, bias = (w.up, w.up_bias) if w.gate is None else (w.gate, w.gate_bias)
    weight = weight.float()
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.float()), weight.T


def calibrate(
    directory: Path, settings: CalibrationSettings, progress: bool = True
) -> dict[str, Any]:
    """Layer by layer: record the calibration text's FFN inputs and activations, train the
    layer's predictor and the previous layer's look-ahead predictor, drop the recordings, and
    take three copies of the held-out text through the layer (dense, with the true active set,
    with the predicted one) for the quality report."""
    t_start = time.perf_counter()
    source = ConvertedModel(directory)
    cfg = source.config
    if ranker_fits(settings, cfg):
        return calibrate_ranker(source, settings, progress)
    if settings.sparsity is None:
        settings = replace(settings, sparsity=0.5)
    ranks = parse_ranks(settings.ranks, cfg.n_layers)
    train_tokens, held_tokens = _texts(source, settings)
    dtype = parse_dtype(settings.dtype)
    model = Transformer(cfg, LayerWeights(source, dtype), None, dtype)  # type: ignore[arg-type]
    train = LayerRun(model, _chunks(train_tokens, min(settings.chunk, cfg.max_positions)))
    held_seqs = _chunks(held_tokens, min(512, cfg.max_positions))
    runs = {name: LayerRun(model, held_seqs) for name in ("dense", "oracle", "predictor")}
    # ReLU (plain or gated) zeroes neurons exactly: "active" is output != 0, nothing to choose.
    relu = cfg.activation == "relu"
    n_val = max(len(train_tokens) // 10, 8)
    layers: list[LowRankPredictor] = []
    look: list[LowRankPredictor | None] = []
    thresholds: list[float] = []
    look_thr: list[float] = []
    activity: list[float] = []
    per_layer: list[dict[str, Any]] = []

    lowrank = settings.fit == "lowrank" or (settings.fit == "auto" and relu)

    def fit(x, h, y, z, i: int, coef=None):
        if lowrank:
            p = fit_lowrank(x[:-n_val], z[:-n_val], ranks[i], 0.0 if relu else activity[i], coef)
        else:
            p = train_predictor(
                x[:-n_val],
                y[:-n_val],
                ranks[i],
                settings.epochs,
                settings.batch,
                settings.lr,
                seed=settings.seed + i,
            )
        with torch.no_grad():
            probs = torch.sigmoid(p(x[-n_val:]))
        return p, pick_threshold(probs, y[-n_val:], settings.target_recall, mass=h[-n_val:])

    def quality(p: LowRankPredictor, thr: float, x: torch.Tensor, h: torch.Tensor, y):
        with torch.no_grad():
            pred = torch.sigmoid(p(x)) > thr
        r, prec, m = recall_precision(pred, y, h)
        return pred, round(r, 4), round(prec, 4), round(m, 4)

    bar = tqdm(total=cfg.n_layers, desc="calibrate", unit="layer", disable=not progress)
    prev_x = prev_hx = None
    for i in range(cfg.n_layers):
        w = source.ffn(i)
        ffns: list[FFNWeights | None] = [None] * cfg.n_layers
        ffns[i] = w.to(dtype)
        dense = DenseFFN(ffns, cfg.activation)  # type: ignore[arg-type]

        x, h = _recorded(train, i, dense)
        activity.append(0.0 if relu else float(np.quantile(h.float().numpy(), settings.sparsity)))
        y = h.float() > activity[i]
        z, coef = _score(x, h, w, relu) if lowrank else (None, None)
        p, thr = fit(x, h, y, z, i, coef)
        layers.append(p)
        thresholds.append(thr)
        if prev_x is not None:
            q, q_thr = fit(prev_x, h, y, z, i - 1)
            look.append(q)
            look_thr.append(q_thr)
        prev_x = x
        del h, y, z

        hx, hh = _recorded(runs["dense"], i, dense)
        hy = hh.float() > activity[i]
        pred, r, prec, m = quality(p, thr, hx, hh, hy)
        per_layer.append(
            {
                "layer": i,
                "rank": ranks[i],
                "active": round(hy.float().mean().item(), 4),
                "predicted": round(pred.float().mean().item(), 4),
                "recall": r,
                "precision": prec,
                "mass_recall": m,
            }
        )
        if prev_hx is not None:
            ahead, r, prec, m = quality(look[i - 1], look_thr[i - 1], prev_hx, hh, hy)  # type: ignore[arg-type]
            row = per_layer[i - 1]
            row["lookahead_predicted"] = round(ahead.float().mean().item(), 4)
            row["lookahead_recall"], row["lookahead_precision"] = r, prec
            row["lookahead_mass_recall"] = m
        prev_hx = hx
        del hh, hy, pred

        a, pl, t = activity[i], p, thr

        def oracle(layer: int, x: torch.Tensor, h: torch.Tensor, a=a) -> torch.Tensor:
            return (h.abs() > a).to(h.dtype)

        def predicted(layer: int, x: torch.Tensor, h: torch.Tensor, pl=pl, t=t) -> torch.Tensor:
            return (torch.sigmoid(pl(x.float())) > t).to(h.dtype)

        runs["oracle"].layer(i, MaskedFFN(dense, mask=oracle))
        runs["predictor"].layer(i, MaskedFFN(dense, mask=predicted))
        bar.update(1)
    bar.close()
    look.append(None)
    look_thr.append(0.5)
    preds = Predictors(layers, thresholds, activity, look, look_thr)

    ppl = {}
    for name, run in runs.items():
        ppl[name], n_tokens = run.perplexity()
    preds.meta = {
        "sparsity": None if relu else settings.sparsity,
        "fit": "lowrank" if lowrank else "sgd",
        "target_recall": settings.target_recall,
        "calibration_tokens": len(train_tokens),
        "heldout_tokens": n_tokens,
        "perplexity": {k: round(v, 4) for k, v in ppl.items()},
        "layers": per_layer,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    preds.save(directory)
    _remove(directory, (RANKER_WEIGHTS, RANKER_META))
    record_selection(directory, (PREDICTOR_WEIGHTS, PREDICTOR_META))
    return preds.meta


def _texts(source: ConvertedModel, settings: CalibrationSettings) -> tuple[list[int], list[int]]:
    """The calibration and held-out tokens."""
    texts = [p.read_text() for p in settings.texts] or [shipped_text("calibration.txt")]
    heldout = settings.heldout.read_text() if settings.heldout else shipped_text("heldout.txt")
    train_tokens = _tokens(source, texts, settings.max_tokens)
    held_tokens = _tokens(source, [heldout], settings.max_tokens)
    if len(train_tokens) < 64 or len(held_tokens) < 16:
        raise ConfigError(
            f"calibration text too short ({len(train_tokens)} tokens; held-out "
            f"{len(held_tokens)}): give at least 64 and 16"
        )
    return train_tokens, held_tokens


def _remove(directory: Path, names: tuple[str, ...]) -> None:
    """A model keeps one selection: the other kind's files go when one is written."""
    for name in names:
        (directory / name).unlink(missing_ok=True)


def ranker_fits(settings: CalibrationSettings, cfg) -> bool:
    """Whether `settings.fit` asks for the gated ranker (auto: every gated non-ReLU model
    whose width the 4-bit groups divide)."""
    if settings.fit == "ranker":
        if not cfg.gated:
            raise ConfigError("fit ranker is for gated (SwiGLU, GeGLU) models", "fit")
        if not supports_ranker(cfg.d_model):
            raise ConfigError(
                f"fit ranker needs d_model divisible by {GROUP}, got {cfg.d_model}", "fit"
            )
        return True
    return (
        settings.fit == "auto"
        and cfg.gated
        and cfg.activation != "relu"
        and supports_ranker(cfg.d_model)
    )


def _threshold(score: torch.Tensor, sparsity: float) -> float:
    """The score a neuron must exceed to leave `sparsity` of the (token, neuron) pairs out: the
    quantile of the scores (at most 4M of them, evenly strided, are looked at); -1 (every
    neuron) for sparsity 0."""
    if sparsity == 0:
        return -1.0
    flat = score.flatten()
    step = flat.numel() // (1 << 22) + 1
    return float(np.quantile(flat[::step].numpy(), sparsity))


def _selected(score: torch.Tensor, threshold: float, gap: int) -> torch.Tensor:
    """[T, n] scores -> the ranker's selection (`ranker.select`) of each token, as a mask."""
    if gap == 0:
        return score > threshold  # what select gives, without a loop over tokens
    mask = torch.zeros_like(score, dtype=torch.bool)
    for row, s in enumerate(score):
        mask[row, torch.from_numpy(select(s, threshold, gap))] = True
    return mask


def calibrate_ranker(
    source: ConvertedModel, settings: CalibrationSettings, progress: bool = True
) -> dict[str, Any]:
    """The gated ranker (`streamer.ranker`): per layer, quantize gate and up to 4 bits, record
    the calibration text's FFN inputs, set the threshold on the ranker's score that leaves
    `settings.sparsity` of the (token, neuron) pairs out (and the look-ahead's: layer l+1's
    ranker on layer l's input), and take the held-out text through the layer twice, dense and
    with the selection, for the report. No training: seconds, not minutes."""
    t_start = time.perf_counter()
    cfg, directory = source.config, source.directory
    if settings.sparsity is None:
        settings = replace(settings, sparsity=RANKER_SPARSITY)
    train_tokens, held_tokens = _texts(source, settings)
    dtype = parse_dtype(settings.dtype)
    model = Transformer(cfg, LayerWeights(source, dtype), None, dtype)  # type: ignore[arg-type]
    train = LayerRun(model, _chunks(train_tokens, min(settings.chunk, cfg.max_positions)))
    held_seqs = _chunks(held_tokens, min(512, cfg.max_positions))
    runs = {name: LayerRun(model, held_seqs) for name in ("dense", "sparse")}
    ranker = GateRanker([], [], [], cfg.activation)
    per_layer: list[dict[str, Any]] = []
    keep = 1 - settings.sparsity
    bar = tqdm(total=cfg.n_layers, desc="calibrate", unit="layer", disable=not progress)
    prev_x = None
    for i in range(cfg.n_layers):
        w = source.ffn(i)
        ffns: list[FFNWeights | None] = [None] * cfg.n_layers
        ffns[i] = w.to(dtype)
        dense = DenseFFN(ffns, cfg.activation)  # type: ignore[arg-type]
        layer = GateRanker.build([w], cfg.activation)
        ranker.layers += layer.layers
        ranker.quantized += layer.quantized
        x, h = _recorded(train, i, dense)
        with torch.no_grad():
            score = ranker.scores(i, x)
            thr = _threshold(score, settings.sparsity)
            ranker.thresholds.append(thr)
            ranker.lookahead_thresholds.append(None)
            if prev_x is not None:
                ahead = _threshold(ranker.scores(i, prev_x), settings.sparsity)
                ranker.lookahead_thresholds[i - 1] = ahead
            chosen = _selected(score, thr, settings.gap)
            mass = h.float()
            per_layer.append(
                {
                    "layer": i,
                    "selected": round(chosen.float().mean().item(), 4),
                    "mass_recall": round((mass * chosen).sum().item() / mass.sum().item(), 4),
                    "threshold": thr,
                }
            )
        prev_x = x
        del h, score, mass, chosen

        def selected(layer: int, x: torch.Tensor, h: torch.Tensor, i=i, t=thr) -> torch.Tensor:
            return _selected(ranker.scores(i, x), t, settings.gap).to(h.dtype)

        runs["dense"].layer(i, MaskedFFN(dense))
        runs["sparse"].layer(i, MaskedFFN(dense, mask=selected))
        bar.update(1)
    bar.close()
    ppl = {}
    for name, run in runs.items():
        ppl[name], n_tokens = run.perplexity()
    ranker.meta = {
        "sparsity": settings.sparsity,
        "gap": settings.gap,
        "keep": round(keep, 4),
        "fit": "ranker",
        "calibration_tokens": len(train_tokens),
        "heldout_tokens": n_tokens,
        "perplexity": {k: round(v, 4) for k, v in ppl.items()},
        "layers": per_layer,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    ranker.save(directory, ranker_fingerprint(source.manifest))
    _remove(directory, (PREDICTOR_WEIGHTS, PREDICTOR_META))
    record_selection(directory, (RANKER_WEIGHTS, RANKER_META))
    return ranker.meta
