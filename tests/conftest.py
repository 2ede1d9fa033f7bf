"""Shared fixtures: small synthetic datasets (2 and 3 modalities) built once per session."""

from __future__ import annotations

import pytest

from dgmrec.data.synthetic import make_synthetic


@pytest.fixture(scope="session")
def small3():
    """240 users x 160 items, three modalities, 60 % of items missing something."""
    return make_synthetic(n_users=240, n_items=160, interactions_per_user=14, seed=3, name="small3")


@pytest.fixture(scope="session")
def small2(small3):
    """The same data with two modalities (image, text)."""
    return small3.select_modalities(["image", "text"])
