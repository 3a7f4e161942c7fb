"""Attribute probes and steering: planted math, the variants, and experiment=attribute on the twins."""

from __future__ import annotations

import json

import numpy as np
import torch

from mcollapse.analysis.attribute import digit_expectation, fit_ridge, projection_std, r_squared, steer
from mcollapse.data.variants import transform_audio, transform_image
from tests.helpers import image_samples, only_run_dir, run_experiment


def test_zero_steering_is_the_baseline_exactly():
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    direction = torch.nn.functional.normalize(torch.randn(8), dim=0)
    assert torch.equal(steer(hidden, direction, 0.0, mask), hidden)
    moved = steer(hidden, direction, 3.0, mask)
    assert torch.equal(moved[~mask], hidden[~mask])
    torch.testing.assert_close((moved - hidden)[mask] @ direction, torch.full((int(mask.sum()),), 3.0))


def test_digit_expectation():
    logits = torch.full((3, 10), -1e9)
    digits = [5, 6, 7, 8, 9]
    logits[0, 7] = 0.0  # all mass on "3"
    logits[1, digits] = 0.0  # uniform: 3
    logits[2, 9] = 5.0
    logits[2, 0] = 100.0  # a non-digit token, ignored by the renormalisation
    expected = digit_expectation(logits, digits)
    torch.testing.assert_close(expected, torch.tensor([3.0, 3.0, 5.0], dtype=torch.float64))


def test_ridge_recovers_a_planted_factor_direction():
    rng = np.random.default_rng(0)
    n, d = 60, 100
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    factor = rng.uniform(0, 2, n)
    X = factor[:, None] * direction * 4 + 0.1 * rng.standard_normal((n, d))
    fit = fit_ridge(X[:40], factor[:40], lam=10.0)
    assert r_squared(factor[40:], fit.predict(X[40:])) > 0.9
    assert abs(float(fit.direction() @ direction)) > 0.9
    assert projection_std(X, direction) > 1.0
    noise = rng.standard_normal((n, d))
    assert r_squared(factor[40:], fit_ridge(noise[:40], factor[:40], 1.0).predict(noise[40:])) < 0.3


def test_variants_change_what_they_say():
    image = image_samples(1)[0].image
    bright = np.asarray(transform_image(image, "brightness", 1.8), dtype=float)
    assert bright.mean() > np.asarray(image, dtype=float).mean()
    red = np.asarray(transform_image(image, "red", 0.5), dtype=float)
    assert red[..., 0].mean() < np.asarray(image, dtype=float)[..., 0].mean()
    assert np.array_equal(np.asarray(transform_image(image, "blur", 0.0)), np.asarray(image.convert("RGB")))
    wave = 0.1 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000).astype(np.float32)
    assert abs(np.abs(transform_audio(wave, "gain", 6.0)).max() / np.abs(wave).max() - 10 ** (6 / 20)) < 1e-3
    assert len(transform_audio(wave, "stretch", 1.25)) < len(wave)
    assert len(transform_audio(wave, "pitch", 2.0)) == len(wave)


def _summary(run):
    return json.loads((run / "results.json").read_text())["summary"]


def test_attribute_on_speech(tmp_path, env):
    run_experiment(["experiment=attribute", "model=tiny_qwen2audio", "dataset=synthetic_speech",
                    "dataset.max_samples=16",
                    "experiment.attributes=[gain,pitch]", "experiment.factors.gain=[-12,0,6]",
                    "experiment.factors.pitch=[-3,0,3]",
                    "hook.llm_layers=[0,9,-4,-1]", "probe.seeds=[1]", "experiment.alphas=[-2,0,2]",
                    "experiment.steer_samples=3"], tmp_path, env)
    run = only_run_dir(tmp_path / "outputs" / "attribute" / "tiny_qwen2audio" / "synthetic_speech")
    s = _summary(run)
    assert s["hooks"][:3] == ["encoder_output", "adapter_output", "llm_hs_0"]
    gain = s["probes"]["gain"]
    assert 0.0 <= gain["adapter_output"]["binary_accuracy"] <= 1.0 and gain["encoder_output"]["r2"] <= 1.0
    steering = s["steering"]["gain"]
    assert steering["layer"] == 15 and steering["alphas"] == [-2.0, 0.0, 2.0]
    assert steering["zero_steering_max_abs_diff"] == {"probe": 0.0, "random_0": 0.0}
    assert steering["shift"]["probe"][1] == 0.0
    assert 1.0 <= steering["baseline"] <= 5.0 and set(steering["rating_by_factor"]) == {"-12", "0", "6"}
    assert (run / "attribute.png").stat().st_size > 0 and (run / "meta.json").is_file()


def test_attribute_on_images_all_positions(tmp_path, env):
    run_experiment(["experiment=attribute", "model=tiny_llava", "dataset=synthetic_vision", "dataset.max_samples=12",
                    "experiment.attributes=[brightness,blur]", "experiment.factors.brightness=[0.5,1,1.5]",
                    "experiment.factors.blur=[0,2,4]",
                    "hook.llm_layers=[0,-4]", "probe.seeds=[1]", "experiment.alphas=[0,3]",
                    "experiment.steer_samples=2", "experiment.steer_positions=all"], tmp_path, env)
    s = _summary(only_run_dir(tmp_path / "outputs" / "attribute" / "tiny_llava" / "synthetic_vision"))
    assert set(s["probes"]) == {"brightness", "blur"}
    assert s["steering"]["blur"]["positions"] == "all"
    assert s["steering"]["brightness"]["shift"]["probe"][0] == 0.0
