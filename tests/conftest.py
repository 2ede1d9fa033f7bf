"""Shared fixtures: small synthetic datasets (2 and 3 modalities) built once per session."""

from __future__ import annotations

import numpy as np
import pytest

from dgmrec.data.masks import draw_new_items
from dgmrec.data.mmrec import make_new_item_split
from dgmrec.data.synthetic import make_synthetic


@pytest.fixture(scope="session")
def small3():
    """240 users x 160 items, three modalities, 60 % of items missing something."""
    return make_synthetic(n_users=240, n_items=160, interactions_per_user=14, seed=3, name="small3")


@pytest.fixture(scope="session")
def small2(small3):
    """The same data with two modalities (image, text)."""
    return small3.select_modalities(["image", "text"])


@pytest.fixture(scope="session")
def small3_new(small3):
    """small3 in the new-item setting (20 % of the items lose their training interactions)."""
    counts = np.bincount(small3.train[:, 1], minlength=small3.n_items)
    return make_new_item_split(small3, draw_new_items(counts))


@pytest.fixture()
def client(run_dir):
    """An HTTP test client of ``dgmrec serve`` on the requesting module's ``run_dir`` (needs the serve extra)."""
    from fastapi.testclient import TestClient

    from dgmrec.serving.app import create_app
    from dgmrec.serving.state import ServingState

    state = ServingState(run_dir)
    with TestClient(create_app(state)) as c:
        yield c
    state.close()
