"""Learning checks that fail when DGMRec's method is crippled, on planted data (see ``planted.py``).

Every item's modalities encode its cluster and every user wants one cluster, so chance and the best content-based
ranking (the *oracle*) follow from the construction: a held-out item's percentile among its candidates is 0.5 in
expectation for a ranking that knows nothing, and :meth:`Planted.oracle_percentile` for one that knows the clusters.
Each check asks for a stated share of that chance-to-oracle gap. The training loop uses the public model interface
(``optimizer_groups``, ``before_epoch``, ``loss``, ``before_evaluation``, ``prepare_eval``, ``score_users``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgmrec.models.base import Batch, ModelInput
from planted import GROUPS, Planted, all_scores, build, content_scores, fit, make_planted, percentiles

# the generation options whose generated rows live in the original feature space (the demo's DGMRec)
CLEAN = {"generation_space": "raw", "recon_target": "original", "decoder_fit": "least_squares_generated"}
# a table that only generation writes to (no gradient into it), so what it holds is what generation wrote
FROZEN = {"trainable_raw_features": False}
SMALL = {"embedding_size": 32}


def gap_share(value: float, oracle: float) -> float:
    """How much of the chance (0.5) to oracle gap ``value`` closes: 0 = chance, 1 = oracle."""
    return (0.5 - value) / (0.5 - oracle)


def content_percentile(planted: Planted, rows: np.ndarray, j: int, items: np.ndarray,
                       pairs: np.ndarray) -> tuple[float, float]:
    """Mean percentile (and the oracle's) of held-out ``pairs`` among ``items``, content ranking of ``rows``."""
    scores, has_profile = content_scores(planted, rows, j)
    pairs = pairs[items[pairs[:, 1]] & has_profile[pairs[:, 0]]]
    assert len(pairs) >= 20, "too few held-out pairs for the check"
    train = planted.ds.train_matrix()
    return float(percentiles(scores, train, pairs, items).mean()), planted.oracle_percentile(pairs, items)


def only_missing(planted: Planted, j: int) -> np.ndarray:
    """Items that miss modality ``j`` and observe the other one (the rows ``write_policy=only_missing_m`` writes)."""
    return np.array([not GROUPS[g][j] and GROUPS[g][1 - j] for g in planted.group])


@pytest.fixture(scope="module")
def planted_missing():
    return make_planted(seed=0)


@pytest.fixture(scope="module")
def planted_new():
    return make_planted(seed=0, new_per_group=2)


@pytest.fixture(scope="module")
def trained_missing(planted_missing):
    """DGMRec after three epochs on the missing-setting planted data (generation before every epoch)."""
    model = build("DGMRec", planted_missing.ds, seed=0, **CLEAN, **FROZEN, **SMALL)
    fit(model, planted_missing.ds, epochs=3, lr=0.01, batch_size=128)
    return model


# ------------------------------------------------------------------------------------------ generation
def test_generation_completes_masked_rows_with_their_content(planted_missing, trained_missing):
    """``completed_features``: observed rows are the input, masked rows are generated and carry the item's cluster:
    ranked by content they close >= 75 % of the chance-to-oracle gap, where the imputed rows tie (chance)."""
    ds = planted_missing.ds
    held = np.concatenate([ds.valid, ds.test])
    imputed = ModelInput.from_dataset(ds).features
    completed = trained_missing.completed_features()
    for j, m in enumerate(ds.modalities):
        obs = ds.observed[:, j]
        x = completed[m].double().numpy()
        np.testing.assert_array_equal(x[obs], ds.features[m][obs])
        assert not np.isclose(x[~obs], imputed[m].double().numpy()[~obs]).all(axis=1).any()  # every row changed
        generated, oracle = content_percentile(planted_missing, x, j, ~obs, held)
        baseline, _ = content_percentile(planted_missing, imputed[m].double().numpy(), j, ~obs, held)
        assert baseline == pytest.approx(0.5, abs=0.02)  # identical rows: all ties
        assert gap_share(generated, oracle) >= 0.75, (m, generated, oracle)


def test_generation_writes_the_rows_the_model_scores_with(planted_missing, trained_missing):
    """Before each epoch DGMRec writes generated rows into its feature table (the state it scores with and
    checkpoints): items missing one modality hold rows that rank them by content like the oracle (>= 75 % of the
    gap; the imputed rows are at chance); items missing every modality keep the imputed row (``only_missing_m``);
    and the scores depend on the written rows."""
    ds = planted_missing.ds
    held = np.concatenate([ds.valid, ds.test])
    state = trained_missing.state_dict()
    imputed = ModelInput.from_dataset(ds).features
    for j, m in enumerate(ds.modalities):
        table = state[f"features.{j}"].double().numpy()
        written = only_missing(planted_missing, j)
        share = gap_share(*content_percentile(planted_missing, table, j, written, held))
        assert share >= 0.75, (m, share)
        untouched = ~written
        np.testing.assert_array_equal(table[untouched], imputed[m].double().numpy()[untouched])
    # the scores read the written rows: putting the imputed rows back changes every masked item's scores
    scores = all_scores(trained_missing)
    reset = {k: v.clone() for k, v in state.items() if k.startswith("features.")}
    for j, m in enumerate(ds.modalities):
        reset[f"features.{j}"] = imputed[m].clone()
    trained_missing.load_state_dict({**state, **reset})
    try:
        changed = np.abs(all_scores(trained_missing) - scores).max(axis=0) > 1e-6
    finally:
        trained_missing.load_state_dict(state)
    assert changed[only_missing(planted_missing, 0) | only_missing(planted_missing, 1)].all()


def test_new_items_get_content_translated_from_their_observed_modality(planted_new):
    """New items have no training users, so their preference filter is zero: only the translator, fed by the
    observed modality, can carry their cluster into the generated rows written before evaluation. Ranked by
    content those rows close >= 70 % of the chance-to-oracle gap (before the write: the imputed rows, chance)."""
    ds = planted_new.ds
    model = build("DGMRec", ds, seed=0, **CLEAN, **FROZEN, **SMALL)
    fit(model, ds, epochs=3, lr=0.01, batch_size=128)
    new = ds.new_items
    before = {j: model.state_dict()[f"features.{j}"].double().numpy().copy() for j in range(ds.n_modalities)}
    model.eval()
    model.before_evaluation(2)
    shares, chance = [], []
    for j in range(ds.n_modalities):
        rows = new & only_missing(planted_new, j)
        after = model.state_dict()[f"features.{j}"].double().numpy()
        shares.append(gap_share(*content_percentile(planted_new, after, j, rows, ds.test_new_only)))
        chance.append(content_percentile(planted_new, before[j], j, rows, ds.test_new_only)[0])
    assert chance == pytest.approx([0.5, 0.5], abs=0.02)
    assert np.mean(shares) >= 0.7, shares


# ---------------------------------------------------------------------------------------------- fusion
def test_multimodal_part_ranks_new_items(planted_new):
    """New items have no interaction: DGMRec's collaborative part cannot rank them (chance, 0.5), its multimodal
    part can. Items that observe at least one modality must close >= 70 % of the chance-to-oracle gap among the new
    items, so the multimodal part is worth at least 0.7 * (0.5 - oracle) in percentile (about 0.27 here)."""
    ds = planted_new.ds
    model = build("DGMRec", ds, seed=0)
    fit(model, ds, epochs=10, lr=0.01, batch_size=128)
    scores = all_scores(model, epoch=9)
    pairs = ds.test_new_only[planted_new.group[ds.test_new_only[:, 1]] < 3]  # items with some content
    value = float(percentiles(scores, ds.train_matrix(), pairs, ds.new_items).mean())
    oracle = planted_new.oracle_percentile(pairs, ds.new_items)
    assert gap_share(value, oracle) >= 0.7, (value, oracle)


def test_training_rows_align_with_scoring_rows_by_hand():
    """A tiny case: the BPR part of the training loss, computed from the batch's distinct users, equals
    ``-mean log sigmoid(s(u, i+) - s(u, i-))`` from the scoring path, for a batch whose users repeat and are not
    sorted; with one user's rows moved to another user the two disagree (the check can fail)."""
    planted = make_planted(n_clusters=2, users_per_cluster=3, items_per_group=2, per_user=5, n_valid=1, n_test=1,
                           seed=4)
    ds = planted.ds
    model = build("DGMRec", ds, seed=0, **SMALL)
    batch = Batch(users=torch.tensor([4, 1, 4, 0, 5, 1]), pos=torch.tensor([8, 2, 12, 0, 14, 3]),
                  neg=torch.tensor([1, 9, 3, 15, 2, 10]))
    model.train()
    bpr = model.loss(batch).parts["bpr"]
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        s = model.score_users(torch.arange(ds.n_users))

    def by_hand(users: torch.Tensor) -> float:
        diff = s[users, batch.pos] - s[users, batch.neg]
        return float(-F.logsigmoid(diff).mean())

    assert bpr == pytest.approx(by_hand(batch.users), rel=1e-5)
    shuffled = batch.users[[2, 1, 0, 5, 4, 3]]  # the rows of other users (and user 4 twice in place)
    assert by_hand(shuffled) != pytest.approx(bpr, rel=1e-3)
