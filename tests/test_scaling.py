"""Feature scaling: hand-computed statistics, old-item statistics only, and modalities of very different scale
brought onto one footing for the models."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from dgmrec import api
from dgmrec.cli import main
from dgmrec.data.dataset import RecDataset
from dgmrec.data.impute import FeatureOptions, impute_features, prepare_features
from dgmrec.data.mmrec import write_mmrec
from dgmrec.data.scaling import FeatureScaler, feature_scales
from dgmrec.data.synthetic import make_synthetic
from dgmrec.models import available_models, get_model_class
from dgmrec.models.base import ModelInput
from dgmrec.training.sampler import NegativeSampler
from model_checks import make_model

X = np.array([[1, 0], [3, 4], [np.nan, np.nan], [5, 8]], dtype=np.float32)
OBS = np.array([True, True, False, True])[:, None]


def test_feature_scales_by_hand():
    sc = feature_scales({"x": X}, OBS)["x"]
    assert sc["mean_row_norm"] == pytest.approx((1 + 5 + np.sqrt(89)) / 3)
    # per-dimension population std over the observed rows: x1 in {1, 3, 5}, x2 in {0, 4, 8}
    assert sc["mean_dim_std"] == pytest.approx((np.sqrt(8 / 3) + np.sqrt(32 / 3)) / 2)


def test_standardize_and_l2_by_hand():
    st = FeatureScaler.fit({"x": X}, OBS, "standardize")
    y = st.transform("x", X)
    np.testing.assert_allclose(y[[0, 1, 3]], [[-np.sqrt(1.5), -np.sqrt(1.5)], [0, 0], [np.sqrt(1.5), np.sqrt(1.5)]],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.inverse("x", y)[OBS[:, 0]], X[OBS[:, 0]], rtol=1e-5)
    l2 = FeatureScaler.fit({"x": X}, OBS, "l2")
    y = l2.transform("x", X)
    np.testing.assert_allclose(y[[0, 1, 3]], [[1, 0], [0.6, 0.8], np.array([5, 8]) / np.sqrt(89)], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(l2.inverse("x", y[[1]])), (1 + 5 + np.sqrt(89)) / 3, rtol=1e-6)
    np.testing.assert_array_equal(FeatureScaler.fit({"x": X}, OBS, "none").transform("x", X)[:2], X[:2])


def test_statistics_come_from_observed_old_items():
    new = np.array([False, False, False, True])
    st = FeatureScaler.fit({"x": X}, OBS, "standardize", reference_items=~new)
    np.testing.assert_allclose(st.shift["x"], [2, 2])  # items 0 and 1 only; item 2 unobserved, item 3 new
    np.testing.assert_allclose(st.scale["x"], [1, 2])


def test_default_is_todays_mean_imputation(small3):
    default = ModelInput.from_dataset(small3)
    plain = impute_features(small3.features, small3.observed, "mean")
    for m in small3.modalities:
        np.testing.assert_array_equal(default.features[m].numpy(), plain[m])


def two_scales(factor: float) -> RecDataset:
    """Two modalities; the second one multiplied by ``factor``."""
    ds = make_synthetic(n_users=60, n_items=40, modalities=(("image", 8), ("audio", 6)), interactions_per_user=8,
                        seed=2)
    return dataclasses.replace(ds, features={"image": ds.features["image"], "audio": ds.features["audio"] * factor},
                               _train_csr=None)


@pytest.mark.parametrize("scaling", ["standardize", "l2"])
def test_scaled_modalities_have_matching_scales(scaling):
    ds = two_scales(1e4)
    raw = feature_scales(ds.features, ds.observed)
    assert raw["audio"]["mean_row_norm"] > 1e3 * raw["image"]["mean_row_norm"]
    scaled = feature_scales(prepare_features(ds, FeatureOptions(scaling=scaling)), ds.observed)
    for key in ("mean_row_norm", "mean_dim_std"):
        a, b = scaled["image"][key], scaled["audio"][key]
        assert max(a, b) / min(a, b) < 2.0, (key, a, b)


def loss_parts(ds: RecDataset, scaling: str, model_name: str = "DGMRec", **overrides: Any) -> dict[str, float]:
    model = make_model(model_name, ds, feature_scaling=scaling, **overrides)
    sampler = NegativeSampler(ds.train, ds.n_items, ds.new_items, seed=0)
    model.train()
    model.before_epoch(0)
    batch = next(iter(sampler.epoch(len(ds.train), True)))
    return model.loss(batch).parts


def dgmrec_parts(ds: RecDataset, scaling: str) -> dict[str, float]:
    return loss_parts(ds, scaling)


FEATURE_MODELS = [m for m in available_models() if get_model_class(m).uses_features]


@pytest.mark.parametrize("model_name", FEATURE_MODELS)
def test_every_model_trains_on_a_1e4_scale_gap_under_the_recommended_scaling(model_name):
    """What DGMRec's recommended preset uses (standardize): a modality 10^4 times larger changes no loss term
    by orders of magnitude, in any model that reads features (unscaled, CI2MG, DGMRec and VBPR fail this)."""
    overrides: dict[str, Any] = {"preset": "recommended"} if model_name == "DGMRec" else {}
    unit = loss_parts(two_scales(1.0), "standardize", model_name, **overrides)
    big = loss_parts(two_scales(1e4), "standardize", model_name, **overrides)
    for key, value in unit.items():
        assert np.isfinite(big[key]) and abs(big[key]) <= 100 * max(abs(value), 1e-3), (key, value, big[key])


def test_recommended_preset_standardises():
    assert make_model("DGMRec", two_scales(1.0), preset="recommended").config["feature_scaling"] == "standardize"


@pytest.mark.parametrize("scaling", ["standardize", "l2"])
def test_loss_terms_do_not_follow_the_feature_scale(scaling):
    unit, big = dgmrec_parts(two_scales(1.0), scaling), dgmrec_parts(two_scales(1e4), scaling)
    for key, value in unit.items():
        assert abs(big[key]) <= 100 * max(abs(value), 1e-3), (key, value, big[key])


def test_unscaled_reconstruction_follows_the_feature_scale():
    """What the scaling prevents: without it the reconstruction term grows with the raw scale."""
    unit, big = dgmrec_parts(two_scales(1.0), "none"), dgmrec_parts(two_scales(1e4), "none")
    assert big["recon"] > 1e4 * unit["recon"]


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory):
    """A DGMRec run with feature_scaling=standardize on a folder whose audio is 1e4 times larger."""
    folder = tmp_path_factory.mktemp("data") / "two"
    write_mmrec(two_scales(1e4), folder)
    out = tmp_path_factory.mktemp("runs") / "std"
    api.train("DGMRec", folder, out=out, overrides={"epochs": 2, "topk": [10, 20], "feature_scaling": "standardize"},
              progress=False)
    return folder, out


def test_data_check_prints_each_modality_scale(scaled_run, capsys):
    folder, _ = scaled_run
    main(["data", "check", str(folder)])
    lines = [line for line in capsys.readouterr().out.splitlines() if "scale of" in line]
    assert len(lines) == 2 and all("row L2 norm" in line and "per-dimension std" in line for line in lines)
    audio = feature_scales(two_scales(1e4).features, two_scales(1e4).observed)["audio"]["mean_row_norm"]
    assert f"{audio:.4g}" in next(line for line in lines if "scale of audio" in line)


def test_generated_rows_return_to_the_stored_scale(scaled_run, tmp_path):
    _, run = scaled_run
    out = api.generate(run, tmp_path / "gen")
    ds = two_scales(1e4)
    generated = np.load(out / "audio_feat.npy")[~ds.observed[:, 1]]
    stored = feature_scales(ds.features, ds.observed)["audio"]["mean_row_norm"]
    assert 0.1 * stored < np.linalg.norm(generated, axis=1).mean() < 10 * stored
