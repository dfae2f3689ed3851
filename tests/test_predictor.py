"""Activation predictors: the closed-form low-rank fit, against its data and against SGD."""

import json

import pytest
import torch

from streamer.calibrate import CalibrationSettings, calibrate
from streamer.convert import convert
from streamer.errors import ConfigError
from streamer.predictor import fit_lowrank, pick_threshold, recall_precision
from streamer.sources import HFSource
from streamer.synth import synth


def test_lowrank_fit_finds_a_low_rank_firing_rule_and_its_odds():
    """z = x·W + b with W of rank 8 plus noise, 5% of z above 0: the rank-8 fit separates the
    active entries, and its sigmoid is a probability (its mean is the active fraction)."""
    gen = torch.Generator().manual_seed(0)
    n_samples, d, n, r = 6000, 96, 300, 8
    w = torch.randn(d, r, generator=gen) @ torch.randn(r, n, generator=gen) / r**0.5
    x = torch.randn(n_samples, d, generator=gen) + 3.0  # an offset the fit has to centre
    z = (x - 3.0) @ w / d**0.5 + 0.1 * torch.randn(n_samples, n, generator=gen) - 1.65
    train, test = slice(0, 5000), slice(5000, None)
    p = fit_lowrank(x[train], z[train], rank=r)
    assert p.down.weight.shape == (r, d) and p.up.weight.shape == (n, r)
    with torch.no_grad():
        probs = torch.sigmoid(p(x[test]))
    y = z[test] > 0
    assert 0.03 < y.float().mean() < 0.08
    recall, precision, _ = recall_precision(probs > 0.5, y)
    assert recall > 0.9 and precision > 0.9
    assert probs.mean().item() == pytest.approx(y.float().mean().item(), rel=0.1)
    # At 99% recall it flags less than twice the active neurons.
    thr = pick_threshold(probs, y, 0.99)
    assert (probs > thr).float().mean() < 2 * y.float().mean()
    # Given the exact coefficients (a layer's own pre-activation), no regression is needed.
    exact = fit_lowrank(x[train], (x[train] - 3.0) @ w / d**0.5 - 1.65, rank=r, coef=w / d**0.5)
    with torch.no_grad():
        assert torch.equal(torch.sigmoid(exact(x[test])) > 0.5, (x[test] - 3.0) @ w > 1.65 * d**0.5)


@pytest.fixture(scope="module")
def synth_opt(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth-opt")
    synth("opt-6.7b", base / "hf", layers=3, scale=16, progress=False, measure_tokens=16)
    return base


def test_closed_form_predictors_flag_fewer_neurons_than_sgd(synth_opt, tmp_path):
    """On a synthetic OPT (ReLU, 3% active): at the same target recall the reduced-rank fit
    flags fewer neurons than gradient descent, keeps as much of the activation mass, and both
    the report and predictors.json say which fit made them."""
    reports = {}
    for fit in ("lowrank", "sgd"):
        out = convert(HFSource(synth_opt / "hf"), tmp_path / fit, progress=False).directory
        settings = CalibrationSettings(
            texts=[synth_opt / "hf" / "calibration.txt"],
            ranks="16",
            epochs=4,
            max_tokens=2048,
            fit=fit,
        )
        reports[fit] = calibrate(out, settings, progress=False)
        assert json.loads((out / "predictors.json").read_text())["fit"] == fit

    def mean(fit: str, key: str) -> float:
        rows = [r[key] for r in reports[fit]["layers"] if key in r]
        return sum(rows) / len(rows)

    assert mean("lowrank", "predicted") < 0.8 * mean("sgd", "predicted")
    assert mean("lowrank", "lookahead_predicted") < mean("sgd", "lookahead_predicted")
    assert mean("lowrank", "mass_recall") > mean("sgd", "mass_recall") - 0.02
    ppl = {
        fit: r["perplexity"]["predictor"] / r["perplexity"]["dense"] for fit, r in reports.items()
    }
    assert ppl["lowrank"] <= ppl["sgd"] * 1.01
    with pytest.raises(ConfigError, match="fit must be auto"):
        CalibrationSettings(fit="magic")
