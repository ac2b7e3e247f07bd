import json

import numpy as np
import pytest
import torch
from scipy import stats

from experiments.theory import theorem1
from experiments.theory.activations import record_bn_inputs
from mbn.data import load_dataset
from mbn.models import build_model


def test_exact_variance_of_the_biased_batch_variance():
    for m in (2, 3, 8, 64):
        # Gaussian: chi2(m-1)/m has variance 2(m-1)/m^2.
        assert theorem1.var_xi_sigma_exact(m, 3.0) == pytest.approx(stats.chi2(m - 1).var() / m**2)
    # Large m: (kappa - 1)/m, not kappa/m.
    assert 1e6 * theorem1.var_xi_sigma_exact(10**6, 6.0) == pytest.approx(5.0, rel=1e-4)
    with pytest.raises(ValueError, match="m must be >= 2"):
        theorem1.var_xi_sigma_exact(1, 3.0)


@pytest.mark.parametrize("distribution", sorted(theorem1.KURTOSIS))
def test_synthetic_data_is_standardized_with_the_stated_kurtosis(distribution):
    x = theorem1.sample_standardized(distribution, (400_000,), np.random.default_rng(0))
    assert x.dtype == np.float64
    assert abs(x.mean()) < 0.01
    assert x.var() == pytest.approx(1.0, abs=0.015)
    assert stats.kurtosis(x, fisher=False) == pytest.approx(theorem1.KURTOSIS[distribution], rel=0.1)


def test_unknown_distribution_is_named_in_the_error():
    with pytest.raises(ValueError, match="'cauchy'"):
        theorem1.sample_standardized("cauchy", (3,), np.random.default_rng(0))


def test_batch_noise_uses_population_stats_and_the_biased_batch_variance():
    batches = np.array([[[1.0, 10.0], [3.0, 14.0]]])  # one batch, m = 2, two neurons
    xi_mu, xi_sigma = theorem1.batch_noise(batches, mean=np.array([1.0, 10.0]), std=np.array([2.0, 4.0]))
    np.testing.assert_allclose(xi_mu, [[(1 - 2) / 2, (10 - 12) / 4]])
    np.testing.assert_allclose(xi_sigma, [[1.0 / 4, 4.0 / 16]])
    with pytest.raises(ValueError, match="m >= 2"):
        theorem1.batch_noise(np.zeros((5, 1)))


def test_gaussian_noise_matches_theorem1_and_kurtosis_sets_the_variance():
    rows, _ = theorem1.run_synthetic(20_000, seed=1, batch_sizes=(4, 64), distributions=("gaussian", "laplace"))
    by_key = {(r["data"], r["m"]): r for r in rows}
    for m in (4, 64):
        gauss = by_key[("gaussian", m)]
        assert gauss["var_mu_ratio"] == pytest.approx(1.0, abs=0.05)
        assert gauss["ks_sigma_chi2"] < 0.02  # ~1.36/sqrt(20000) = 0.0096 is the 95% noise level
        assert gauss["mean_sigma"] == pytest.approx((m - 1) / m, abs=0.01)
    laplace = by_key[("laplace", 64)]
    assert laplace["var_sigma_ratio_exact"] == pytest.approx(1.0, abs=0.1)
    # m Var(xi_sigma) -> kappa - 1 = 5: at m = 64 the exact value is 4.88, far from kappa = 6.
    assert abs(laplace["m_var_sigma"] - 5.0) < abs(laplace["m_var_sigma"] - 6.0)
    assert laplace["ks_sigma_chi2"] > 0.05  # the chi2 law is Gaussian-only


def test_record_bn_inputs_records_the_layer_input():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, width=4)
    images = load_dataset("fake", num_train=24, num_test=2, num_classes=3, image_size=8, seed=0).train.images
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    recorded = record_bn_inputs(model, "stem.1", images, mean, std, batch_size=10)
    with torch.no_grad():
        x = model.stem[0]((images.float() / 255 - 0.5) / 0.25).double()
    assert recorded["feature_shape"] == (4, 8, 8)
    assert recorded["spatial_size"] == 64
    np.testing.assert_allclose(recorded["image_mean"], x.mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recorded["image_sqmean"], x.square().mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recorded["center"], x[:, :, 4, 4].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'nope' not found"):
        record_bn_inputs(model, "nope", images, mean, std)


def test_run_real_recovers_iid_theory_on_iid_neurons():
    rng = np.random.default_rng(0)
    center = rng.standard_normal((5000, 3)) * 2.0 + 1.0
    neuron_rows, channel_rows, _ = theorem1.run_real(center, center, center**2, 1, 4000, seed=0, batch_sizes=(8,))
    assert neuron_rows[0]["var_mu_ratio"] == pytest.approx(1.0, abs=0.08)
    assert neuron_rows[0]["var_sigma_ratio_exact"] == pytest.approx(1.0, abs=0.1)
    # With one pixel per image the channel view is the neuron view: one independent sample per image.
    assert channel_rows[0]["n_eff_per_image"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.slow
def test_command_quick_with_fake_real_activations(tmp_path):
    out = tmp_path / "theorem1"
    # layer1 (16 channels) keeps the fake-data forward passes and per-channel statistics cheap.
    summary = theorem1.main(["--out", str(out), "--quick", "--batches", "1000", "--real-fake", "--real-images", "256",
                             "--real-layer", "layer1.0.norm1", "--train-steps", "2"])
    for name in ("theorem1.csv", "summary.json", "real_neuron.csv", "real_channel.csv", "theorem1_qq.png",
                 "theorem1_variance_ks.png", "theorem1_real_kurtosis.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.stat().st_size < 200_000
    saved = json.loads((out / "summary.json").read_text())
    assert [r["m"] for r in saved["real"]["neuron"]] == list(theorem1.BATCH_SIZES)
    assert saved["real"]["setup"]["training"]["steps"] == 2
    assert saved["real"]["setup"]["images_recorded"] == 256
    assert len(summary["synthetic"]) == len(theorem1.KURTOSIS) * len(theorem1.BATCH_SIZES)
    for row in saved["real"]["neuron"]:
        assert row["mean_sigma"] == pytest.approx((row["m"] - 1) / row["m"], abs=0.05)


def test_command_rejects_conflicting_real_sources(tmp_path, capsys):
    with pytest.raises(SystemExit):
        theorem1.main(["--out", str(tmp_path), "--real-fake", "--real-archive", "x.tar.gz"])
    assert "exclude each other" in capsys.readouterr().err


def test_brief_training_is_reproducible_and_learns():
    from experiments.theory.activations import train_briefly

    data = load_dataset("fake", num_train=64, num_test=2, num_classes=2, image_size=8, seed=0)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("resnet18", num_classes=2, width=4)
        report = train_briefly(model, data.train.images, data.train.labels, data.mean, data.std, steps=8,
                               batch_size=16, seed=3)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert report["steps"] == 8 and not model.training
    assert torch.equal(weights[0], weights[1])
    assert report["last_loss"] < report["first_loss"]
    with pytest.raises(ValueError, match="steps must be >= 0"):
        train_briefly(model, data.train.images, data.train.labels, data.mean, data.std, steps=-1)
