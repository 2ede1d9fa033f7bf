"""Model contract checks for the CF references and DGMRec on 2 and 3 modalities."""

from __future__ import annotations

import pytest

from model_checks import (
    check_beats_popularity,
    check_contract,
    check_deterministic,
)

MODELS = ["LightGCN", "MFBPR", "DGMRec"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("data", ["small2", "small3"])
def test_contract(name, data, request):
    ds = request.getfixturevalue(data)
    check_contract(name, ds)


@pytest.mark.parametrize("name", MODELS)
def test_beats_popularity(name, small3, tmp_path):
    check_beats_popularity(name, small3, tmp_path, epochs=25, learning_rate=0.005)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic(name, small2, tmp_path):
    check_deterministic(name, small2, tmp_path)
