"""Sampling filters against transformers' logits processors, applied in the same order."""

from __future__ import annotations

import pytest
import torch

from streamer.errors import ConfigError
from streamer.generate import SamplingParams, penalize, probabilities, sample

SETTINGS = [
    dict(temperature=0.8, top_k=5),
    dict(temperature=1.3, top_p=0.7),
    dict(temperature=0.9, min_p=0.1),
    dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    dict(temperature=1.0, top_p=1.0, repetition_penalty=0.8),
]


def reference(logits: torch.Tensor, seen: list[int], p: SamplingParams) -> torch.Tensor:
    """transformers' processors: repetition penalty, temperature, top-k, top-p, min-p."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids, scores = torch.tensor([seen]), logits[None].double()
    chain = [RepetitionPenaltyLogitsProcessor(p.repetition_penalty)]
    chain.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        chain.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        chain.append(MinPLogitsWarper(p.min_p))
    for processor in chain:
        scores = processor(ids, scores)
    return torch.softmax(scores[0], -1)


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_the_distribution_equals_transformers_processors(settings):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(300, generator=gen) * 3
    seen = [3, 3, 17, 250, 299]
    p = SamplingParams(**settings)
    ours = probabilities(penalize(logits, seen, p.repetition_penalty), p)
    theirs = reference(logits, seen, p)
    assert torch.equal(ours > 0, theirs > 0)  # the same tokens survive each filter
    assert torch.allclose(ours, theirs, atol=1e-9)
    assert (ours > 0).sum() < 300 or settings.get("top_p") == 1.0  # the filters cut something


def test_the_penalty_changes_greedy_choice_and_sampling_stays_seeded():
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    greedy = SamplingParams(temperature=0)
    assert sample(logits, greedy, torch.Generator(), seen=[]) == 0
    penalized = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert sample(logits, penalized, torch.Generator(), seen=[0]) == 1
    p = SamplingParams(temperature=1.0, top_k=2, top_p=1.0)
    draws = [sample(logits, p, torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) == {0, 1}  # top-k: never token 3
    assert draws == [sample(logits, p, torch.Generator().manual_seed(s)) for s in range(40)]


@pytest.mark.parametrize(
    ("bad", "setting"),
    [
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_a_bad_sampling_setting_is_one_error_naming_it(bad, setting):
    with pytest.raises(ConfigError, match=setting) as e:
        SamplingParams(**bad)
    assert e.value.setting == setting
