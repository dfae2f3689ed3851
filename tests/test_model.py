"""The dense model code against the `transformers` reference, family by family."""

from __future__ import annotations

import pytest

from streamer.generate import Generation, SamplingParams
from streamer.sources import HFSource, load_dense
from tests.helpers import PROMPT, greedy_with_logits
from tests.models import FAMILIES, hf_logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, hf_model):
    directory = hf_model(family)
    model = load_dense(HFSource(directory))
    tokens, ours = greedy_with_logits(model, PROMPT, 16)
    ref = hf_logits(directory, tokens)
    assert ours.shape == ref.shape == (len(PROMPT) + 16, model.cfg.vocab_size)
    assert (ours - ref).abs().max().item() < 1e-4


def test_generation_matches_reference_greedy_tokens(hf_model):
    directory = hf_model("llama")
    model = load_dense(HFSource(directory))
    out = Generation(model, PROMPT, SamplingParams(max_tokens=12, temperature=0)).run()
    ref = hf_logits(directory, PROMPT + out)
    # Each generated token is the reference's argmax at the position before it.
    assert out == ref[len(PROMPT) - 1 : -1].argmax(-1).tolist()


def test_sampling_is_seeded_and_respects_top_p(hf_model):
    model = load_dense(HFSource(hf_model("opt")))
    params = SamplingParams(max_tokens=10, temperature=1.5, top_p=0.95, seed=7)
    first = Generation(model, PROMPT, params).run()
    assert Generation(model, PROMPT, params).run() == first
    other = Generation(
        model, PROMPT, SamplingParams(max_tokens=10, temperature=1.5, top_p=0.95, seed=8)
    ).run()
    assert other != first
    # A tiny nucleus leaves only the top token: sampling becomes greedy.
    greedy = Generation(model, PROMPT, SamplingParams(max_tokens=10, temperature=0)).run()
    assert (
        Generation(model, PROMPT, SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6)).run()
        == greedy
    )


def test_stops_at_eos(hf_model):
    model = load_dense(HFSource(hf_model("llama")))
    greedy = Generation(model, PROMPT, SamplingParams(max_tokens=8, temperature=0)).run()
    run = Generation(
        model, PROMPT, SamplingParams(max_tokens=8, temperature=0, stop_ids=(greedy[2],))
    )
    assert run.run() == greedy[: greedy.index(greedy[2]) + 1]
    assert run.summary["stop_reason"] == "eos"
