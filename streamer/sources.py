"""Where a model is read from: a Hugging Face directory, a GGUF file, or a converted directory.

Every source answers the same questions in the canonical names the model code uses: its
`ModelConfig`, its resident tensors (embeddings, attention, norms, LM head, FFN biases), one
layer's FFN matrices neuron-major, and its tokenizer. Tensors are read lazily, one at a time, so
converting a 13 GB model never holds it whole in DRAM. `streamer.registry.open_source` picks the
reader by path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from streamer.config import ModelConfig, from_gguf_metadata
from streamer.errors import ModelFormatError
from streamer.model import DenseFFN, FFNWeights, Transformer
from streamer.tokenizer import TokenizerSpec


class Source(Protocol):
    config: ModelConfig
    description: str

    def resident_names(self) -> list[str]: ...

    def resident(self, name: str) -> torch.Tensor: ...

    def ffn(self, layer: int) -> FFNWeights: ...

    def tokenizer(self) -> TokenizerSpec | None: ...


def resident_names(cfg: ModelConfig) -> list[str]:
    """Canonical names of every tensor kept in DRAM for good (the paper's selective persistence)."""
    names = ["embed.weight"]
    if cfg.positions == "learned":
        names.append("pos_embed.weight")
    if cfg.d_embed:
        names += ["proj_in.weight", "proj_out.weight"]
    norm_parts = ["weight", "bias"] if cfg.norm == "layer" else ["weight"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        norms = ["attn_norm"] + (["ffn_norm"] if cfg.block != "parallel" or cfg.ffn_norm else [])
        names += [f"{p}{n}.{part}" for n in norms for part in norm_parts]
        for proj in ("wq", "wk", "wv", "wo"):
            names.append(f"{p}attn.{proj}.weight")
            if cfg.attn_bias if proj != "wo" else cfg.attn_out_bias:
                names.append(f"{p}attn.{proj}.bias")
        if cfg.ffn_bias:
            names += [f"{p}ffn.up_bias", f"{p}ffn.down_bias"]
            if cfg.gated:
                names.append(f"{p}ffn.gate_bias")
    if cfg.final_norm:
        names += [f"final_norm.{part}" for part in norm_parts]
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names


def ffn_from_resident(
    get: Callable[[str], torch.Tensor],
    cfg: ModelConfig,
    layer: int,
    up: torch.Tensor,
    down: torch.Tensor,
    gate: torch.Tensor | None,
):
    """Attach a layer's resident FFN biases to its matrices."""
    p = f"layers.{layer}.ffn."
    return FFNWeights(
        up=up,
        down=down,
        gate=gate,
        up_bias=get(p + "up_bias") if cfg.ffn_bias else None,
        gate_bias=get(p + "gate_bias") if cfg.ffn_bias and cfg.gated else None,
        down_bias=get(p + "down_bias") if cfg.ffn_bias else None,
    )


def load_dense(
    source: Source, dtype: torch.dtype = torch.float32, progress: bool = False
) -> Transformer:
    """Every weight in DRAM: the reference path (`progress`: a bar on stderr, layer by layer)."""
    cfg = source.config
    weights = {n: source.resident(n).to(dtype) for n in source.resident_names()}
    bar = tqdm(range(cfg.n_layers), desc="load", unit="layer", disable=not progress, leave=False)
    layers = [source.ffn(i).to(dtype) for i in bar]
    return Transformer(cfg, weights, DenseFFN(layers, cfg.activation), dtype)


class LayerWeights(Mapping):
    """The resident tensors of a source in `dtype`, holding the globals (embeddings, final norm,
    head) and one layer's at a time: a model run layer by layer needs one layer in DRAM."""

    def __init__(self, source: Source, dtype: torch.dtype) -> None:
        self.source, self.dtype = source, dtype
        self.names = source.resident_names()
        self.known = set(self.names)
        self.globals = {n: self._load(n) for n in self.names if not n.startswith("layers.")}
        self.layer: str | None = None
        self.held: dict[str, torch.Tensor] = {}

    def _load(self, name: str) -> torch.Tensor:
        return self.source.resident(name).to(self.dtype)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.globals:
            return self.globals[name]
        if not name.startswith("layers.") or name not in self.known:
            raise KeyError(name)
        layer = name.split(".")[1]
        if layer != self.layer:
            prefix = f"layers.{layer}."
            self.held = {n: self._load(n) for n in self.names if n.startswith(prefix)}
            self.layer = layer
        return self.held[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# --------------------------------------------------------------------------- Hugging Face


class SafetensorsFiles:
    """The tensors of a (possibly sharded) safetensors checkpoint, read on demand."""

    def __init__(self, directory: Path) -> None:

        self._error = SafetensorError
        self._open = safe_open
        index = directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelFormatError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                bins = list(directory.glob("*.bin")) + list(directory.glob("*.pt"))
                hint = " (only PyTorch pickles found: save it with safetensors)" if bins else ""
                raise ModelFormatError(f"{directory}: no *.safetensors weights{hint}")
            weight_map = {}
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise ModelFormatError(
                f"{directory}: missing shard(s) {', '.join(missing)} named in "
                "model.safetensors.index.json"
            )
        self.handles = {}
        for f in files:
            try:
                self.handles[f] = safe_open(str(directory / f), framework="pt")
            except (self._error, OSError) as e:
                raise ModelFormatError(
                    f"{directory / f}: unreadable or truncated shard ({e})"
                ) from None
            for key in self.handles[f].keys():  # noqa: SIM118 (safe_open is no mapping)
                weight_map.setdefault(key, f)
        self.where = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ModelFormatError(f"checkpoint lacks the tensor {name!r}")
        try:
            return self.handles[self.where[name]].get_tensor(name)
        except self._error as e:
            raise ModelFormatError(f"{self.where[name]}: cannot read {name!r} ({e})") from None


class HFSource:
    """A Hugging Face model directory: `config.json` plus safetensors (sharded or not)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise ModelFormatError(f"{directory}: no config.json (not a Hugging Face model dir)")
        try:
            self.hf_config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ModelFormatError(f"{cfg_path}: invalid JSON ({e})") from None
        gen = directory / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                self.hf_config = {**self.hf_config, "eos_token_id": eos}
        self.config = ModelConfig.from_hf(self.hf_config)
        self.files = SafetensorsFiles(directory)
        self.description = f"Hugging Face directory {directory}"
        self._names = self._name_map()
        for canon in resident_names(self.config):
            if canon not in self._names:
                raise ModelFormatError(f"{directory}: no tensor for {canon!r}")

    def _prefix(self, *candidates: str) -> str:
        probe = {
            "llama": "embed_tokens.weight",
            "opt": "decoder.embed_tokens.weight",
            "falcon": "word_embeddings.weight",
        }[self.config.family]
        for c in candidates:
            if c + probe in self.files:
                return c
        raise ModelFormatError(
            f"{self.directory}: cannot find the embeddings ({probe!r} under "
            f"any of the prefixes {candidates})"
        )

    def _name_map(self) -> dict[str, Callable[[], torch.Tensor]]:
        """Canonical resident name -> loader from the checkpoint."""
        cfg, g = self.config, self.files.get
        m: dict[str, Callable[[], torch.Tensor]] = {}

        def alias(canon: str, name: str) -> None:
            if name in self.files:
                m[canon] = lambda: g(name)

        if cfg.family == "llama":
            pre = self._prefix("model.", "")
            alias("embed.weight", pre + "embed_tokens.weight")
            for i in range(cfg.n_layers):
                s, c = f"{pre}layers.{i}.", f"layers.{i}."
                alias(c + "attn_norm.weight", s + "input_layernorm.weight")
                alias(c + "ffn_norm.weight", s + "post_attention_layernorm.weight")
                for canon, hf in (
                    ("wq", "q_proj"),
                    ("wk", "k_proj"),
                    ("wv", "v_proj"),
                    ("wo", "o_proj"),
                ):
                    for part in ("weight", "bias"):
                        alias(f"{c}attn.{canon}.{part}", f"{s}self_attn.{hf}.{part}")
                for canon, hf in (("up", "up_proj"), ("gate", "gate_proj"), ("down", "down_proj")):
                    alias(f"{c}ffn.{canon}_bias", f"{s}mlp.{hf}.bias")
            alias("final_norm.weight", pre + "norm.weight")
            alias("lm_head.weight", "lm_head.weight")
            self._ffn_names = (
                pre + "layers.{}.mlp.up_proj.weight",
                pre + "layers.{}.mlp.down_proj.weight",
                pre + "layers.{}.mlp.gate_proj.weight",
            )
        elif cfg.family == "opt":
            pre = self._prefix("model.", "")
            d = pre + "decoder."
            alias("embed.weight", d + "embed_tokens.weight")
            alias("pos_embed.weight", d + "embed_positions.weight")
            alias("proj_in.weight", d + "project_in.weight")
            alias("proj_out.weight", d + "project_out.weight")
            for part in ("weight", "bias"):
                alias(f"final_norm.{part}", f"{d}final_layer_norm.{part}")
            for i in range(cfg.n_layers):
                s, c = f"{d}layers.{i}.", f"layers.{i}."
                for part in ("weight", "bias"):
                    alias(f"{c}attn_norm.{part}", f"{s}self_attn_layer_norm.{part}")
                    alias(f"{c}ffn_norm.{part}", f"{s}final_layer_norm.{part}")
                    for canon, hf in (
                        ("wq", "q_proj"),
                        ("wk", "k_proj"),
                        ("wv", "v_proj"),
                        ("wo", "out_proj"),
                    ):
                        alias(f"{c}attn.{canon}.{part}", f"{s}self_attn.{hf}.{part}")
                alias(c + "ffn.up_bias", s + "fc1.bias")
                alias(c + "ffn.down_bias", s + "fc2.bias")
            alias("lm_head.weight", "lm_head.weight")
            self._ffn_names = (d + "layers.{}.fc1.weight", d + "layers.{}.fc2.weight", None)
        else:
            pre = self._prefix("transformer.", "")
            alias("embed.weight", pre + "word_embeddings.weight")
            for part in ("weight", "bias"):
                alias(f"final_norm.{part}", f"{pre}ln_f.{part}")
            for i in range(cfg.n_layers):
                s, c = f"{pre}h.{i}.", f"layers.{i}."
                for part in ("weight", "bias"):
                    two_norms = cfg.block == "parallel" and cfg.ffn_norm
                    alias(
                        f"{c}attn_norm.{part}",
                        f"{s}ln_attn.{part}" if two_norms else f"{s}input_layernorm.{part}",
                    )
                    alias(
                        f"{c}ffn_norm.{part}",
                        f"{s}ln_mlp.{part}" if two_norms else f"{s}post_attention_layernorm.{part}",
                    )
                    alias(f"{c}attn.wo.{part}", f"{s}self_attention.dense.{part}")
                    qkv = f"{s}self_attention.query_key_value.{part}"
                    if qkv in self.files:
                        for j, canon in enumerate(("wq", "wk", "wv")):
                            m[f"{c}attn.{canon}.{part}"] = lambda qkv=qkv, j=j: self._split_qkv(
                                qkv
                            )[j]
                alias(c + "ffn.up_bias", s + "mlp.dense_h_to_4h.bias")
                alias(c + "ffn.down_bias", s + "mlp.dense_4h_to_h.bias")
            alias("lm_head.weight", "lm_head.weight")
            self._ffn_names = (
                pre + "h.{}.mlp.dense_h_to_4h.weight",
                pre + "h.{}.mlp.dense_4h_to_h.weight",
                None,
            )
        return m

    @lru_cache(maxsize=2)  # noqa: B019 (one source per model; q, k, v come from one read)
    def _split_qkv(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Falcon's fused query_key_value into separate q, k, v (rows are the output features)."""
        cfg, w = self.config, self.files.get(name)
        hd, H, KV = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        rest = w.shape[1:]
        if KV == 1 and H != 1 and w.shape[0] == (H + 2) * hd:  # multi-query (Falcon-7B)
            return w[: H * hd], w[H * hd : (H + 1) * hd], w[(H + 1) * hd :]
        if KV == H:  # per head: (q, k, v) interleaved
            g = w.reshape(H, 3, hd, *rest)
            return tuple(g[:, j].reshape(H * hd, *rest) for j in range(3))  # type: ignore
        # new decoder architecture: groups of (H/KV queries, one key, one value)
        g = w.reshape(KV, H // KV + 2, hd, *rest)
        return (
            g[:, :-2].reshape(H * hd, *rest),
            g[:, -2].reshape(KV * hd, *rest),
            g[:, -1].reshape(KV * hd, *rest),
        )

    def resident_names(self) -> list[str]:
        return resident_names(self.config)

    def resident(self, name: str) -> torch.Tensor:
        return self._names[name]()

    def ffn(self, layer: int) -> FFNWeights:
        up, down, gate = self._ffn_names
        g = self.files.get
        return ffn_from_resident(
            self.resident,
            self.config,
            layer,
            up=g(up.format(layer)),
            down=g(down.format(layer)).t(),
            gate=g(gate.format(layer)) if gate else None,
        )

    def tokenizer(self) -> TokenizerSpec | None:
        return TokenizerSpec.from_hf_dir(self.directory, self.config)


# --------------------------------------------------------------------------- GGUF

# GGML types we dequantize (the gguf package does the arithmetic).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


class GGUFSource:
    """A llama-architecture GGUF file (SmolLM2, Llama, Mistral), dequantized tensor by tensor."""

    def __init__(self, path: Path) -> None:

        self.path = path
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, IndexError) as e:
            raise ModelFormatError(f"{path}: not a readable GGUF file ({e})") from None
        except Exception as e:  # numpy raises bare errors on truncated memmaps
            raise ModelFormatError(f"{path}: not a readable GGUF file ({e})") from None
        self.meta = {}
        for key, field in self.reader.fields.items():
            try:
                self.meta[key] = field.contents()
            except Exception:  # an exotic field type we do not need
                continue
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.tensor_type.name not in GGUF_TYPES:
                raise ModelFormatError(
                    f"{path}: tensor {t.name!r} has quantization type "
                    f"{t.tensor_type.name}, which is not supported "
                    f"(supported: {', '.join(GGUF_TYPES)})"
                )
        self.config = from_gguf_metadata(self.meta, has_output="output.weight" in self.tensors)
        self.description = f"GGUF file {path}"
        self._names = {
            "embed.weight": "token_embd.weight",
            "final_norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        }
        for i in range(self.config.n_layers):
            for canon, g in (
                ("attn_norm.weight", "attn_norm.weight"),
                ("ffn_norm.weight", "ffn_norm.weight"),
                ("attn.wq.weight", "attn_q.weight"),
                ("attn.wk.weight", "attn_k.weight"),
                ("attn.wv.weight", "attn_v.weight"),
                ("attn.wo.weight", "attn_output.weight"),
            ):
                self._names[f"layers.{i}.{canon}"] = f"blk.{i}.{g}"
        for canon in resident_names(self.config):
            if self._names[canon] not in self.tensors:
                raise ModelFormatError(f"{path}: no tensor {self._names[canon]!r}")

    def _load(self, name: str) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: no tensor {name!r}")
        try:
            arr = self._gguf.quants.dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise ModelFormatError(f"{self.path}: cannot dequantize {name!r} ({e})") from None
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims innermost first
        return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))

    def _unpermute(self, w: torch.Tensor, heads: int) -> torch.Tensor:
        # llama.cpp's converter interleaves the rotary halves of q and k; undo it so the
        # weights follow the Hugging Face (rotate_half) convention our model code uses.
        rows = w.shape[0]
        return (
            w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        )

    def resident_names(self) -> list[str]:
        return resident_names(self.config)

    def resident(self, name: str) -> torch.Tensor:
        w = self._load(self._names[name])
        if name.endswith("attn.wq.weight"):
            return self._unpermute(w, self.config.n_heads)
        if name.endswith("attn.wk.weight"):
            return self._unpermute(w, self.config.n_kv_heads)
        return w

    def ffn(self, layer: int) -> FFNWeights:
        p = f"blk.{layer}."
        return FFNWeights(
            up=self._load(p + "ffn_up.weight"),
            down=self._load(p + "ffn_down.weight").t(),
            gate=self._load(p + "ffn_gate.weight"),
        )

    def ffn_blocks(self, layer: int, kind) -> dict[str, np.ndarray]:
        """The layer's gate and up rows as the file stores them, where the file stores them in
        `kind` (a `streamer.blocks.Kind`): a neuron's gate and up vectors are rows of the file's
        matrices, so their blocks go into bundles unchanged. Down is never here: a neuron's down
        vector is a column of the file's matrix and crosses its blocks (it is quantized again)."""
        out = {}
        for part in ("gate", "up"):
            t = self.tensors.get(f"blk.{layer}.ffn_{part}.weight")
            if kind.quantized and t is not None and t.tensor_type == kind.ggml:
                out[part] = np.asarray(t.data, dtype=np.uint8)
        return out

    def ffn_block_kinds(self) -> set[str]:
        """The GGUF types the file stores its gate and up matrices in ("Q4_1", "F16", ...)."""
        return {
            t.tensor_type.name
            for name, t in self.tensors.items()
            if name.startswith("blk.") and name.endswith((".ffn_gate.weight", ".ffn_up.weight"))
        }

    def tokenizer(self) -> TokenizerSpec | None:
        return TokenizerSpec.from_gguf_metadata(self.meta)
