"""Small random `transformers` models of every supported family, saved as the Hugging Face files
the engine reads. They are made here, never downloaded: the reference for every model path."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320

# name -> (transformers config class name, kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "llama-relu-bias": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            hidden_act="relu",
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    "llama3-rope": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            },
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=None,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        ),
    ),
    "opt-postnorm": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            do_layer_norm_before=False,
            word_embed_proj_dim=32,
        ),
    ),
    "falcon": (
        "FalconConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            bias=False,
            activation="relu",
            new_decoder_architecture=False,
        ),
    ),
    "falcon-newarch": (
        "FalconConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            activation="gelu",
        ),
    ),
    "falcon-sequential": (
        "FalconConfig",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=False,
            parallel_attn=False,
            bias=True,
            activation="relu",
        ),
    ),
}


def train_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = (
        "the quick brown fox jumps over the lazy dog. flash memory holds the model; "
        "dram holds the window of active neurons. "
    ) * 20
    tok.train_from_iterator([text], trainer)
    return tok


def make_hf_model(name: str, directory: Path, seed: int = 0, edit=None, **overrides) -> Path:
    """A random model of family `name` saved to `directory` (float32 safetensors + tokenizer);
    `edit(model)` may change its weights first."""
    import transformers

    cls_name, kwargs = FAMILIES[name]
    config = getattr(transformers, cls_name)(
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.15,
        pad_token_id=1,
        **{**kwargs, **overrides},
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if edit is not None:
        with torch.no_grad():
            edit(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    train_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


def hf_logits(directory: Path, tokens: list[int]) -> torch.Tensor:
    """The reference: transformers' logits for a token sequence, [T, vocab] float32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def make_sparse_opt(directory: Path, shift: float = 0.5, seed: int = 0, **overrides) -> Path:
    """A random OPT whose FFN is sparse like a trained ReLU model's: fc1 biases shifted down,
    some neurons more often active than others."""

    def shift_biases(model) -> None:
        for layer in model.model.decoder.layers:
            n = layer.fc1.bias.shape[0]
            layer.fc1.bias.copy_(-shift * torch.linspace(0.2, 2.0, n)[torch.randperm(n)])

    return make_hf_model("opt", directory, seed, edit=shift_biases, **overrides)
