"""Synthetic 7B-shaped models with sparsity like trained ReLU models': `streamer synth`.

No 7B checkpoint can be downloaded here, so the benchmark builds its own: a Hugging Face directory
with the real shapes (OPT-6.7B, Falcon-7B relufied, Llama-2-7B with ReLU) and random weights
shaped so that a real forward pass is sparse the way the paper's models are:

- each FFN neuron i fires with its own probability p_i: its pre-activation is a unit-variance
  projection of the normalized input, shifted down by a bias of -Φ⁻¹(1 - p_i) (the up bias for
  OPT and Falcon, the gate's for Llama). The p_i are log-normal around the target active fraction
  (3% for OPT, 5% for Falcon and Llama), so some neurons are far more often active than others;
- attention is nearly uniform (small query/key weights) with strong values, so each token's
  residual stream carries a running mean of the tokens before it, and consecutive tokens share
  most of their active set.

Tensor names and shapes come from `transformers` itself (the model built on the meta device, no
memory), and the weights are written one safetensors shard per layer, so memory stays at one
layer. Afterwards a forward pass over the shipped calibration text, one layer in memory at a time,
measures what matters: the active fraction per token, how unequal the neurons are, and the
fraction of neurons newly needed per token with a window of k tokens (the paper's 10% -> 2.4%).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import zlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from streamer.errors import ConfigError
from streamer.layout import parse_dtype
from streamer.model import ACTIVATION_FNS, KVCache, Transformer, ffn_forward
from streamer.sources import HFSource, LayerWeights
from streamer.tokenizer import TokenizerSpec

log = logging.getLogger(__name__)
GB = 10**9
# Scale of the attention output: how much each token's residual stream carries of the tokens
# before it, so how many active neurons consecutive tokens share. 1.0 makes the neurons newly
# needed per token with a window of 5 about 0.24 of the active ones (measured with 32 layers at
# --scale 16: 0.74% of 3.07%), the paper's ratio for OPT-6.7B (2.4% against 10%); 3.0 gave 0.06.
CONTEXT = 1.0
# Trained models' neurons are predictable from a low-rank view of their input (the paper's rank
# 128 predictors); i.i.d. random weights are not, and no predictor learns them from any number of
# tokens. So the projection that decides whether a neuron fires is mostly low-rank: rank d/64 (64
# for d 4096), with NOISE of its standard deviation unstructured, which no predictor can see.
RANK_DIV = 64
CALIBRATION_TOKENS = 20000  # about 25,000 once re-encoded (the byte-level text splits anew)
NOISE = 0.15


@dataclass(frozen=True)
class Shape:
    family: str
    hf: dict[str, Any]  # the transformers config
    active: float  # target fraction of FFN neurons active per token
    paper: dict[str, float]  # the paper's figures for the real model (fractions)


SHAPES: dict[str, Shape] = {
    "opt-6.7b": Shape(
        "opt",
        dict(
            model_type="opt",
            architectures=["OPTForCausalLM"],
            hidden_size=4096,
            ffn_dim=16384,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=50272,
            max_position_embeddings=2048,
            word_embed_proj_dim=4096,
            do_layer_norm_before=True,
            activation_function="relu",
            enable_bias=True,
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=2,
            pad_token_id=1,
        ),
        0.03,
        {"sparsity": 0.97, "new_per_token_window5": 0.024},
    ),
    "falcon-7b": Shape(
        "falcon",
        dict(
            model_type="falcon",
            architectures=["FalconForCausalLM"],
            hidden_size=4544,
            num_hidden_layers=32,
            num_attention_heads=71,
            multi_query=True,
            new_decoder_architecture=False,
            parallel_attn=True,
            bias=True,  # relufied with a shift: the FFN needs biases
            activation="relu",
            vocab_size=65024,
            max_position_embeddings=2048,
            alibi=False,
            tie_word_embeddings=True,
            bos_token_id=11,
            eos_token_id=11,
        ),
        0.05,
        {"sparsity": 0.95, "new_per_token_window4": 0.031},
    ),
    "llama-2-7b": Shape(
        "llama",
        dict(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            hidden_act="relu",
            mlp_bias=True,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        0.05,
        {},
    ),
}

# The widths `--scale` shrinks with the head count (a small model of the same family).
_DIMS = {
    "opt": ("hidden_size", "ffn_dim", "word_embed_proj_dim"),
    "falcon": ("hidden_size",),
    "llama": ("hidden_size", "intermediate_size"),
}


def hf_config(like: str, layers: int | None = None, scale: int = 1) -> dict[str, Any]:
    if like not in SHAPES:
        raise ConfigError(f"like must be one of {', '.join(SHAPES)}, got {like!r}", "like")
    if scale < 1 or (scale & (scale - 1)):
        raise ConfigError(f"scale must be a power of two, got {scale}", "scale")
    shape = SHAPES[like]
    hf = dict(shape.hf)
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"layers must be at least 1, got {layers}", "layers")
        hf["num_hidden_layers"] = layers
    if scale > 1:  # fewer heads of the same size; the other widths in proportion
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
        heads = max(hf["num_attention_heads"] // scale, 1)
        ratio = heads * head_dim / hf["hidden_size"]
        for key in _DIMS[shape.family]:
            hf[key] = int(hf[key] * ratio)
        hf["num_attention_heads"] = heads
        if "num_key_value_heads" in hf:
            hf["num_key_value_heads"] = heads
        hf["vocab_size"] = max(hf["vocab_size"] // scale, 1024)
    return hf


def _meta_model(hf: dict[str, Any]):
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "streamer synth takes tensor names and shapes from `transformers`: "
            "pip install transformers"
        ) from None
    cls = getattr(transformers, hf["architectures"][0].replace("ForCausalLM", "Config"))
    config = cls(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    config.architectures = hf["architectures"]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return config, model


def _role(name: str) -> str:
    """What a tensor is, from its Hugging Face name."""
    base = name.rsplit(".", 1)[0]
    kind = name.rsplit(".", 1)[1]
    if "norm" in base or base.endswith(("layernorm", "ln_f")):
        return f"norm_{kind}"
    pieces = {
        "embed_tokens": "embed",
        "word_embeddings": "embed",
        "embed_positions": "positions",
        "lm_head": "head",
        "q_proj": "qk",
        "k_proj": "qk",
        "v_proj": "v",
        "query_key_value": "qkv",
        "o_proj": "o",
        "out_proj": "o",
        "self_attention.dense": "o",
        "fc1": "up",
        "up_proj": "up",
        "dense_h_to_4h": "up",
        "gate_proj": "gate",
        "fc2": "down",
        "down_proj": "down",
        "dense_4h_to_h": "down",
    }
    for piece, role in pieces.items():
        if base.endswith(piece):
            return f"{role}_{kind}"
    raise ConfigError(f"synth does not know how to fill {name!r}")


class WeightMaker:
    """Deterministic random tensors by role (a generator seeded per tensor name)."""

    def __init__(self, family: str, hf: dict[str, Any], active: float, seed: int) -> None:
        self.family, self.hf, self.seed = family, hf, seed
        self.d = hf["hidden_size"]
        self.n = hf.get("ffn_dim") or hf.get("intermediate_size") or 4 * self.d
        self.active = active
        self.context = CONTEXT
        self.tied = bool(hf.get("tie_word_embeddings"))

    def _seed(self, name: str) -> int:
        return self.seed * 2**32 + zlib.crc32(name.encode())

    def _gen(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(name))

    def neuron_probabilities(self, layer_name: str) -> np.ndarray:
        """p_i per neuron: log-normal around the target, mean `active`, within [1e-4, 0.5]."""
        rng = np.random.default_rng(self._seed(layer_name))
        p = np.exp(rng.normal(0.0, 1.0, self.n))
        p = np.clip(p / p.mean() * self.active, 1e-4, 0.5)
        return p * (self.active / p.mean())

    def structured(self, g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        """[n, d] rows of norm about 1: sqrt(1 - NOISE²) of each row in a rank-d/RANK_DIV
        subspace shared by the layer's neurons, NOISE² of its variance in no structure."""
        n, d = shape
        r = max(d // RANK_DIV, 4)
        a = torch.randn(n, r, generator=g) / math.sqrt(r)
        b = torch.randn(r, d, generator=g) / math.sqrt(d)
        noise = torch.randn(n, d, generator=g) / math.sqrt(d)
        return math.sqrt(1 - NOISE**2) * (a @ b) + NOISE * noise

    def make(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        role = _role(name)
        g, d, n = self._gen(name), self.d, self.n

        def normal(std: float) -> torch.Tensor:
            return torch.randn(shape, generator=g) * std

        if role == "norm_weight" and self.tied and not any(p.isdigit() for p in name.split(".")):
            # The final norm of a model whose head is its (unit-variance) embedding: scaled so
            # that logits have unit variance, not sqrt(d) (perplexities that mean something).
            t = torch.full(shape, 1 / math.sqrt(d))
        elif role == "norm_weight":
            t = torch.ones(shape)
        elif role.endswith("_bias") and role not in ("up_bias", "gate_bias"):
            t = torch.zeros(shape)
        elif role == "embed_weight":
            t = normal(1.0)
        elif role == "positions_weight":
            t = normal(0.1)
        elif role == "head_weight":
            t = normal(1 / math.sqrt(d))
        elif role == "qk_weight":
            t = normal(0.02 / math.sqrt(d))  # nearly uniform attention: a running mean
        elif role == "qkv_weight":  # Falcon: q and k small, v (the last head_dim rows) strong
            t = normal(0.02 / math.sqrt(d))
            hd = d // self.hf["num_attention_heads"]
            t[-hd:] = torch.randn(hd, shape[1], generator=g) / math.sqrt(d)
        elif role == "v_weight":
            t = normal(1 / math.sqrt(d))
        elif role == "o_weight":
            t = normal(self.context / math.sqrt(d))  # how much the context outweighs the token
        elif role == ("gate_weight" if self.family == "llama" else "up_weight"):
            # The projection whose sign decides activity: unit variance, mostly low-rank.
            t = self.structured(g, shape)
        elif role in ("up_weight", "gate_weight"):
            t = normal(1 / math.sqrt(d))  # a unit-variance projection of the normalized input
        elif role == "down_weight":
            t = normal(0.5 / math.sqrt(self.active * n))
        elif role in ("up_bias", "gate_bias"):
            shifts = role == ("gate_bias" if self.family == "llama" else "up_bias")
            if shifts:
                p = self.neuron_probabilities(name.rsplit(".", 2)[0])
                inv = NormalDist().inv_cdf
                t = torch.tensor([-inv(1 - float(q)) for q in p])
            else:
                t = torch.zeros(shape)
        else:
            raise ConfigError(f"synth does not know how to fill {name!r} ({role})")
        return t.to(dtype)


def synth(
    like: str,
    out: Path,
    layers: int | None = None,
    scale: int = 1,
    seed: int = 0,
    dtype: str = "float16",
    progress: bool = True,
    measure_tokens: int = 96,
    window: int = 5,
) -> dict[str, Any]:
    """Write the model into `out` (a new directory), then measure its sparsity; the report."""

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: give a new directory")
    torch_dtype = parse_dtype(dtype)
    hf = hf_config(like, layers, scale)
    shape = SHAPES[like]
    config, meta = _meta_model(hf)
    tensors = meta.state_dict()
    if config.tie_word_embeddings:  # transformers saves the tied head once, as the embedding
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    total = sum(v.numel() for v in tensors.values()) * torch_dtype.itemsize
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    log.info(
        "synth %s: %d tensors, %.2f GB in %s; converting it needs as much again (about %.1f GB "
        "in all); %.1f GB free",
        like,
        len(tensors),
        total / GB,
        dtype,
        2 * total / GB,
        free / GB,
    )
    if free < total * 1.02:
        out.rmdir()
        raise ConfigError(
            f"not enough free disk in {out}: {total / GB:.1f} GB needed, {free / GB:.1f} GB free"
        )
    maker = WeightMaker(shape.family, hf, shape.active, seed)
    groups: dict[str, list[str]] = {}
    for name in tensors:
        parts = name.split(".")
        idx = next((p for p in parts if p.isdigit()), None)
        groups.setdefault(f"layer{int(idx):03d}" if idx is not None else "other", []).append(name)
    shards = sorted(groups)
    weight_map: dict[str, str] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="synth", disable=not progress)
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        block = {}
        for name in groups[group]:
            block[name] = maker.make(name, tuple(tensors[name].shape), torch_dtype).contiguous()
            weight_map[name] = fname
        save_file(block, str(out / fname), metadata={"format": "pt"})
        bar.update(sum(t.numel() * t.element_size() for t in block.values()))
        del block
    bar.close()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.dtype = dtype
    config.save_pretrained(out)
    _write_tokenizer(out)
    report = {
        "like": like,
        "layers": hf["num_hidden_layers"],
        "d_model": hf["hidden_size"],
        "d_ffn": maker.n,
        "bytes": total,
        "dtype": dtype,
        "target_active": shape.active,
        "paper": shape.paper,
        "write_seconds": round(time.perf_counter() - t0, 1),
    }
    report.update(measure(out, measure_tokens, window, progress))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "synth.json").write_text(json.dumps(report, indent=1))
    return report


def _write_tokenizer(out: Path) -> None:
    """A byte-level BPE trained on the shipped calibration text (ids well below the model's
    vocabulary), so that `streamer calibrate` and `generate` work on the synthetic model."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (files("streamer") / "data" / "calibration.txt").read_text()
    tok.train_from_iterator([text], trainer)
    tok.save(str(out / "tokenizer.json"))
    # The predictors' calibration text: tokens drawn uniformly from the vocabulary. A random
    # model's neurons see each token's random embedding, and the predictors generalize to
    # held-out text only when they have seen them all: on the OPT-6.7B shape (3 layers), the
    # shipped text (3,670 tokens) gave predictors that flag 27-36% of the neurons to catch the
    # 3% active, 16,384 of these 5.6-8.5%.
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tok.get_vocab_size(), CALIBRATION_TOKENS).tolist()
    (out / "calibration.txt").write_text(tok.decode(ids))


@torch.inference_mode()
def measure(directory: Path, tokens: int, window: int, progress: bool = True) -> dict[str, Any]:
    """A forward pass over the shipped calibration text, one layer's weights in memory at a
    time: per layer, the active fraction per token, the share of activations that the most
    active 10% of neurons account for, and the fraction of neurons newly needed per token when
    the last `window` tokens' neurons are kept."""

    source = HFSource(directory)
    cfg = source.config
    tok = TokenizerSpec.from_hf_dir(directory).build()
    ids = tok.encode((files("streamer") / "data" / "calibration.txt").read_text())[:tokens]
    act = ACTIVATION_FNS[cfg.activation]
    active: list[torch.Tensor] = []
    bar = tqdm(total=cfg.n_layers, desc="measure", unit="layer", disable=not progress)

    def ffn(x: torch.Tensor, layer: int) -> torch.Tensor:
        w = source.ffn(layer)
        w = w.to(torch.float32)

        def record(h: torch.Tensor) -> torch.Tensor:
            active.append(h != 0)
            return h

        bar.update(1)
        return ffn_forward(x, w, act, record)

    model = Transformer(cfg, LayerWeights(source, torch.float32), ffn, torch.float32)
    cache = KVCache(cfg, len(ids), torch.float32)
    model.forward(torch.tensor(ids), cache, last_only=True)
    bar.close()
    per_layer = []
    for a in active:  # [T, n] booleans
        frac = a.float().mean(1)  # per token
        counts = a.sum(0).float()
        top = counts.sort(descending=True).values[: max(len(counts) // 10, 1)]
        new = []
        for t in range(window, a.shape[0]):
            kept = a[t - window : t].any(0)
            new.append((a[t] & ~kept).float().mean().item())
        per_layer.append(
            {
                "active": frac.mean().item(),
                "top10_share": (top.sum() / counts.sum().clamp(min=1)).item(),
                "new_per_token": float(np.mean(new)) if new else float("nan"),
            }
        )
    mean = {k: round(float(np.mean([r[k] for r in per_layer])), 4) for k in per_layer[0]}
    return {
        "measured_tokens": len(ids),
        "window": window,
        "active_per_token": mean["active"],
        "sparsity": round(1 - mean["active"], 4),
        "top10_share": mean["top10_share"],
        f"new_per_token_window{window}": mean["new_per_token"],
        "per_layer": [{k: round(v, 4) for k, v in r.items()} for r in per_layer],
    }
