import json

import pytest

from experiments.theory import mbn_noise


def test_formulas():
    assert mbn_noise.predicted_variance_ratio(0.0) == 1.0
    assert mbn_noise.predicted_variance_ratio(0.9) == pytest.approx(0.1 / 1.9)
    assert mbn_noise.equivalent_batch_size(4, 0.5) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="lam must be in"):
        mbn_noise.predicted_variance_ratio(1.0)


def test_layer_buffers_follow_the_recursion_and_the_stationary_variance():
    row = mbn_noise.measure(0.8, 4, channels=256, steps=600, seed=0)
    assert row["layer_vs_recursion_max_abs_diff"] < 1e-12
    assert row["var_M_ratio"] == pytest.approx(1.0, abs=0.1)
    assert row["var_Phi_ratio"] == pytest.approx(1.0, abs=0.15)
    assert row["mean_Phi"] == pytest.approx(0.75, abs=0.01)  # biased batch variance: (m-1)/m
    assert row["m_eq"] == pytest.approx(36.0, rel=0.1)
    plain = mbn_noise.measure(0.0, 4, channels=256, steps=600, seed=1)
    assert plain["var_M"] == pytest.approx(0.25, rel=0.1)


def test_schedule_ends_at_equivalent_batch_2m0_minus_m():
    curves = mbn_noise.schedule_curves(200, (2, 16))
    for m in (2, 16):
        curve = curves["curves"][m]
        assert curve["lam"][0] == pytest.approx(0.0, abs=1e-12)
        assert curve["m_eq"][-1] == pytest.approx(2 * 32 - m)
        assert all(a <= b for a, b in zip(curve["lam"], curve["lam"][1:]))


@pytest.mark.slow
def test_command_quick(tmp_path):
    out = tmp_path / "mbn_noise"
    mbn_noise.main(["--out", str(out), "--quick", "--steps", "100", "--channels", "32"])
    for name in ("mbn_noise.csv", "summary.json", "mbn_noise.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "summary.json").read_text())
    assert len(saved["rows"]) == len(mbn_noise.LAMS) * len(mbn_noise.BATCH_SIZES)
    assert max(r["layer_vs_recursion_max_abs_diff"] for r in saved["rows"]) < 1e-12
