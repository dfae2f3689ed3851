"""One architecture description for every supported family.

Hugging Face `config.json` files and GGUF metadata spell the same facts in many ways; this module
reads them into one frozen `ModelConfig` that the model code, the converter and the manifest of a
converted model share. Anything we cannot run exactly is refused here with a message that names it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from streamer.errors import ModelFormatError

FAMILIES = ("llama", "opt", "falcon")
ACTIVATIONS = ("silu", "relu", "gelu", "gelu_tanh")

# Hugging Face spellings of the activations we implement.
_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}

# Hugging Face `architectures` entries, by family.
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "OPTForCausalLM": "opt",
    "FalconForCausalLM": "falcon",
    "RWForCausalLM": "falcon",
}


@dataclass(frozen=True)
class ModelConfig:
    family: str  # llama | opt | falcon
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ffn: int
    activation: str  # one of ACTIVATIONS
    gated: bool  # SwiGLU-style FFN: act(gate x) * (up x)
    norm: str  # "rms" | "layer"
    norm_eps: float
    # Block shape: "sequential" (attention, then FFN), "parallel" (attention and FFN read the
    # same block input and both add to the residual: Falcon) or "post_norm" (OPT-350m).
    block: str = "sequential"
    # Parallel blocks only: whether the FFN has its own norm (Falcon's new decoder architecture).
    ffn_norm: bool = True
    positions: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_positions: int = 2048
    position_offset: int = 0  # OPT's learned positions start at index 2
    attn_bias: bool = False  # q, k, v projections
    attn_out_bias: bool = False
    ffn_bias: bool = False
    final_norm: bool = True
    tie_embeddings: bool = False
    d_embed: int = 0  # OPT's word_embed_proj_dim when it differs from d_model; 0 otherwise
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = [
            (self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}"),
            (
                self.activation in ACTIVATIONS,
                f"activation {self.activation!r} is not supported "
                f"(supported: {', '.join(ACTIVATIONS)})",
            ),
            (self.norm in ("rms", "layer"), f"norm must be 'rms' or 'layer', got {self.norm!r}"),
            (
                self.block in ("sequential", "parallel", "post_norm"),
                f"unknown block {self.block!r}",
            ),
            (self.positions in ("rope", "learned"), f"unknown positions {self.positions!r}"),
            (
                min(
                    self.vocab_size,
                    self.d_model,
                    self.n_layers,
                    self.n_heads,
                    self.n_kv_heads,
                    self.head_dim,
                    self.d_ffn,
                )
                > 0,
                "every size in the config must be positive",
            ),
            (
                self.n_heads % self.n_kv_heads == 0,
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ModelFormatError(f"model config: {message}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", "default")
            if kind not in ("default", "llama3", "linear"):
                raise ModelFormatError(
                    f"model config: rope scaling {kind!r} is not supported "
                    "(supported: default, linear, llama3)"
                )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ModelFormatError(f"model config: unknown fields {sorted(unknown)}")
        for f in dataclasses.fields(cls):
            if f.name in d and not _has_type(d[f.name], str(f.type)):
                raise ModelFormatError(
                    f"model config: {f.name} must be {_TYPE_WORDS.get(str(f.type), f.type)}, "
                    f"got {d[f.name]!r:.40}"
                )
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        try:
            return cls(**d)
        except TypeError as e:
            raise ModelFormatError(f"model config: {e}") from None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` (already parsed)."""
        archs = hf.get("architectures") or []
        family = next((_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES), None)
        if family is None:
            family = {
                "llama": "llama",
                "mistral": "llama",
                "opt": "opt",
                "falcon": "falcon",
                "RefinedWeb": "falcon",
                "RefinedWebModel": "falcon",
            }.get(hf.get("model_type"))
        if family is None:
            raise ModelFormatError(
                f"unsupported architecture {archs or hf.get('model_type')!r}: supported are "
                f"{', '.join(sorted(_HF_ARCHITECTURES))}"
            )
        try:
            return {"llama": _llama_from_hf, "opt": _opt_from_hf, "falcon": _falcon_from_hf}[
                family
            ](hf)
        except KeyError as e:
            raise ModelFormatError(f"config.json lacks the field {e.args[0]!r}") from None


def _activation(name: str | None) -> str:
    act = _HF_ACTIVATIONS.get(name or "")
    if act is None:
        raise ModelFormatError(
            f"activation {name!r} is not supported "
            f"(supported: {', '.join(sorted(_HF_ACTIVATIONS))})"
        )
    return act


def _eos(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 moved rope_theta and rope_scaling into one rope_parameters dict.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    params["rope_type"] = kind
    return theta, params


def _llama_from_hf(hf: dict[str, Any]) -> ModelConfig:
    n_heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf)
    if hf.get("sliding_window") and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
        max_pos = int(hf["sliding_window"])  # Mistral: we attend to everything, so cap the context
    else:
        max_pos = int(hf.get("max_position_embeddings", 2048))
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ffn=hf["intermediate_size"],
        activation=_activation(hf.get("hidden_act", "silu")),
        gated=True,
        norm="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_positions=max_pos,
        attn_bias=bool(hf.get("attention_bias", False)),
        attn_out_bias=bool(hf.get("attention_bias", False)),
        ffn_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos(hf),
    )


def _opt_from_hf(hf: dict[str, Any]) -> ModelConfig:
    d = hf["hidden_size"]
    n_heads = hf["num_attention_heads"]
    pre_norm = hf.get("do_layer_norm_before", True)
    embed = hf.get("word_embed_proj_dim", d)
    return ModelConfig(
        family="opt",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d // n_heads,
        d_ffn=hf["ffn_dim"],
        activation=_activation(hf.get("activation_function", "relu")),
        gated=False,
        norm="layer",
        norm_eps=1e-5,
        block="sequential" if pre_norm else "post_norm",
        positions="learned",
        max_positions=int(hf.get("max_position_embeddings", 2048)),
        position_offset=2,
        attn_bias=bool(hf.get("enable_bias", True)),
        attn_out_bias=bool(hf.get("enable_bias", True)),
        ffn_bias=bool(hf.get("enable_bias", True)),
        final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        d_embed=embed if embed != d else 0,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos(hf),
    )


def _falcon_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("alibi"):
        raise ModelFormatError("Falcon with ALiBi positions is not supported (only rotary)")
    d = hf.get("hidden_size") or hf["n_embed"]
    n_heads = hf.get("num_attention_heads") or hf["n_head"]
    new_arch = bool(hf.get("new_decoder_architecture", False))
    multi_query = bool(hf.get("multi_query", True))
    if new_arch:
        n_kv = hf.get("num_kv_heads") or n_heads
    elif multi_query:
        n_kv = 1
    else:
        n_kv = n_heads
    parallel = bool(hf.get("parallel_attn", True)) or new_arch
    n_ln = hf.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    theta, scaling = _rope(hf)
    bias = bool(hf.get("bias", False))
    return ModelConfig(
        family="falcon",
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf.get("num_hidden_layers") or hf["n_layer"],
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=d // n_heads,
        d_ffn=hf.get("ffn_hidden_size") or 4 * d,
        activation=_activation(hf.get("activation", "gelu")),
        gated=False,
        norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        block="parallel" if parallel else "sequential",
        ffn_norm=(n_ln == 2) if parallel else True,
        rope_theta=theta,
        rope_scaling=scaling,
        max_positions=int(hf.get("max_position_embeddings", 2048)),
        attn_bias=bias,
        attn_out_bias=bias,
        ffn_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos(hf),
    )


def from_gguf_metadata(meta: dict[str, Any], has_output: bool) -> ModelConfig:
    """Read llama-architecture GGUF metadata (already decoded to Python values)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelFormatError(
            f"unsupported GGUF architecture {arch!r}: only 'llama' "
            "(Llama, Mistral, SmolLM2) is read from GGUF; convert others "
            "from their Hugging Face directory"
        )
    try:
        n_heads = int(meta["llama.attention.head_count"])
        d = int(meta["llama.embedding_length"])
        head_dim = int(meta.get("llama.rope.dimension_count", d // n_heads))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            family="llama",
            vocab_size=int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
            d_model=d,
            n_layers=int(meta["llama.block_count"]),
            n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            d_ffn=int(meta["llama.feed_forward_length"]),
            activation="silu",
            gated=True,
            norm="rms",
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            max_positions=int(meta.get("llama.context_length", 2048)),
            tie_embeddings=not has_output,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )
    except KeyError as e:
        raise ModelFormatError(f"GGUF metadata lacks {e.args[0]!r}") from None


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "int | None": "an integer or null",
    "dict[str, Any] | None": "an object or null",
    "tuple[int, ...]": "a list of integers",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a config field's annotation (a config read from a file)."""
    checks = {
        "int": _is_int,
        "float": lambda v: _is_int(v) or isinstance(v, float),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "int | None": lambda v: v is None or _is_int(v),
        "dict[str, Any] | None": lambda v: v is None or isinstance(v, dict),
        "tuple[int, ...]": lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)),
    }
    return checks[annotation](value)
