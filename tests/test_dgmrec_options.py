"""DGMRec's presets and options: every option, run away from its default, changes what it claims to change.

Models are built on the small synthetic fixtures (160 items); options that do not change what is built are
compared on two models from the same seed, which start with identical parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from dgmrec.config import resolve_config, shipped
from dgmrec.data.dataset import RecDataset
from dgmrec.errors import ConfigError
from dgmrec.losses import info_nce
from dgmrec.models.base import Batch
from dgmrec.models.dgmrec import DGMRec
from dgmrec.training.sampler import NegativeSampler
from model_checks import make_model

# ------------------------------------------------------------------------------------------------ helpers


def build(ds: RecDataset, **options: Any) -> DGMRec:
    model = make_model("DGMRec", ds, seed=0, **options)
    assert isinstance(model, DGMRec)
    return model


def same_start(a: DGMRec, b: DGMRec) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def first_batch(ds: RecDataset, size: int = 256) -> Batch:
    return next(iter(NegativeSampler(ds.train, ds.n_items, ds.new_items, seed=0).epoch(size, True)))


def distinct_batch(ds: RecDataset) -> Batch:
    """Training pairs with no user and no positive item twice."""
    users, items = [], []
    for u, i in ds.train:
        if u not in users and i not in items:
            users.append(int(u))
            items.append(int(i))
    neg = [(i + 1) % ds.n_items for i in items]
    return Batch(torch.tensor(users), torch.tensor(items), torch.tensor(neg))


def loss_parts(model: DGMRec, batch: Batch) -> dict[str, float]:
    torch.manual_seed(5)  # the noise pi(.) and the CLUB permutation draw from the global generator
    with torch.no_grad():
        return model.loss(batch).parts


def tables(model: DGMRec) -> list[torch.Tensor]:
    return [x.detach().clone() for x in model.features]


def changed_rows(before: list[torch.Tensor], after: list[torch.Tensor]) -> list[np.ndarray]:
    return [np.flatnonzero((b != a).any(dim=1).numpy()) for b, a in zip(before, after, strict=True)]


def graph_rows_changed(old: Any, new: Any) -> np.ndarray:
    diff = (old.scipy - new.scipy).tocsr()
    diff.eliminate_zeros()
    return np.flatnonzero(np.diff(diff.indptr))


def missing_sets(ds: RecDataset) -> dict[str, np.ndarray]:
    """Per policy, the (item, modality) cells it names: missing m, and how many others are observed."""
    obs = ds.observed
    n_obs = obs.sum(axis=1)[:, None]
    return {"only_missing_m": ~obs & (n_obs == obs.shape[1] - 1), "any_missing_with_one_observed": ~obs & (n_obs >= 1),
            "all_missing": ~obs}


# ------------------------------------------------------------------------------------------------ presets


def test_reference_preset_is_the_default_and_recommended_sets_its_options():
    default, layers = resolve_config("DGMRec", "syn")
    assert default["preset"] == "reference" and "presets" not in default
    assert resolve_config("DGMRec", "syn", overrides={"preset": "reference"})[0] == default
    presets = shipped("models", "DGMRec")["presets"]
    assert set(presets) == {"reference", "recommended"}
    recommended, layers = resolve_config("DGMRec", "syn", overrides={"preset": "recommended"})
    assert layers[-2:] == ["models/DGMRec presets.recommended", "--set"]
    assert {k: recommended[k] for k in presets["recommended"]} == presets["recommended"]
    assert {k: v for k, v in recommended.items() if default[k] != v} == {"preset": "recommended",
                                                                      **presets["recommended"]}
    assert recommended["decoder_fit"] != default["decoder_fit"]


def test_explicit_settings_beat_the_preset_key_by_key(tmp_path):
    cfg, _ = resolve_config("DGMRec", "syn", overrides={"preset": "recommended", "decoder_fit": "least_squares"})
    assert cfg["decoder_fit"] == "least_squares" and cfg["generation_space"] == "raw"
    # the preset chosen in a user file; --set still wins over both; the preset beats a shipped best config
    user = tmp_path / "user.yaml"
    user.write_text("preset: recommended\nrecon_target: table\n")
    cfg, layers = resolve_config("DGMRec", "tiktok", file=user, overrides={"generation_space": "propagated"})
    assert (cfg["preset"], cfg["recon_target"], cfg["generation_space"], cfg["decoder_fit"]) == (
        "recommended", "table", "propagated", "least_squares_generated")
    assert layers.index("models/DGMRec presets.recommended") == layers.index("best/DGMRec_tiktok") + 1
    # --set preset=reference undoes a preset chosen in the file
    cfg, _ = resolve_config("DGMRec", "syn", file=user, overrides={"preset": "reference"})
    assert cfg["generation_space"] == "reference" and cfg["recon_target"] == "table"


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match=r"preset.*reference, recommended"):
        resolve_config("DGMRec", "syn", overrides={"preset": "fast"})


# ------------------------------------------------------------------------------------- model structure


def test_trainable_raw_features_false_freezes_the_tables(small2):
    batch = first_batch(small2)
    for trainable in (True, False):
        model = build(small2, trainable_raw_features=trainable)
        before = tables(model)
        opt = torch.optim.Adam(model.optimizer_groups(), lr=0.01)
        model.loss(batch).total.backward()
        opt.step()
        moved = [not torch.equal(b, x.detach()) for b, x in zip(before, model.features, strict=True)]
        assert moved == [trainable] * model.M


def test_paper_preference_mode_averages_a_user_table_through_a_sigmoid(small2):
    r = small2.train_matrix().toarray()
    deg = r.sum(axis=0)
    mean = (r.T / np.maximum(deg, 1)[:, None])  # items x users, rows average the item's training users
    code = build(small2)
    paper = build(small2, preference_mode="paper_sigmoid_table")
    assert not hasattr(paper, "preference") and len(paper.preference_tables) == 2
    with torch.no_grad():
        for j in range(2):
            per_user = torch.tanh(code.preference[j](code.user_embedding)).numpy()
            np.testing.assert_allclose(code.item_filter(j).numpy(), mean @ per_user, atol=1e-5)
            table = paper.preference_tables[j].numpy()
            np.testing.assert_allclose(paper.item_filter(j).numpy(), 1 / (1 + np.exp(-(mean @ table))), atol=1e-5)


@pytest.mark.parametrize(("data", "option", "estimators"), [("small2", "first_two", 2), ("small3", "first_two", 2),
                                                            ("small3", "all", 3)])
def test_club_modalities_all_builds_one_estimator_per_modality(data, option, estimators, request):
    ds = request.getfixturevalue(data)
    model = build(ds, club_modalities=option)
    assert len(model.club) == estimators == len(model.club_mods)
    assert "club" in loss_parts(model, first_batch(ds))
    assert len(build(ds, club_modalities=option, sampler=0.0).club) == 0


# --------------------------------------------------------------------------------------------- losses


def _batch_reps(model: DGMRec, batch: Batch) -> dict[str, list[torch.Tensor]]:
    with torch.no_grad():
        f = model.forward_all(model.train_graphs, users=batch.users)
    return {"u_g": f["user_g"], "u_s": f["user_s"], "p_g": [g[batch.pos] for g in f["g"]],
            "p_s": [s[batch.pos] for s in f["s"]]}


def test_cyclic_inter_user_pairs_add_the_other_pairs(small3, small2):
    batch = first_batch(small3)
    ref, cyc = build(small3), build(small3, inter_user_pairs="cyclic")
    same_start(ref, cyc)
    reps = _batch_reps(ref, batch)
    tau = ref.tau_inter_modal
    extra = sum(float(info_nce(reps["u_g"][a], reps["u_g"][b], tau)) for a, b in [(1, 2), (2, 0)])
    got = loss_parts(cyc, batch)["inter"] - loss_parts(ref, batch)["inter"]
    assert got == pytest.approx(ref.weights.inter_modal * extra, rel=1e-4)
    # two modalities have a single pair: nothing changes
    b2 = first_batch(small2)
    assert loss_parts(build(small2, inter_user_pairs="cyclic"), b2) == loss_parts(build(small2), b2)


def test_intra_specific_uses_the_third_modality_specific_features(small3):
    batch = first_batch(small3)
    ref, spec = build(small3), build(small3, intra_specific="specific")
    reps = _batch_reps(ref, batch)
    tau = ref.tau_user_item
    want = float(info_nce(reps["u_s"][2], reps["p_s"][2], tau)) - float(info_nce(reps["u_g"][2], reps["p_g"][2], tau))
    got = loss_parts(spec, batch)["intra"] - loss_parts(ref, batch)["intra"]
    assert got == pytest.approx(ref.weights.user_item * want, rel=1e-4)


def test_nce_duplicates_mask_changes_infonce_only_on_batches_with_duplicates(small2):
    keep, mask = build(small2), build(small2, nce_duplicates="mask")
    dup = first_batch(small2)
    assert len(torch.unique(dup.users)) < len(dup.users) and len(torch.unique(dup.pos)) < len(dup.pos)
    a, b = loss_parts(keep, dup), loss_parts(mask, dup)
    for part in ("inter", "intra", "bm"):
        assert a[part] != pytest.approx(b[part], rel=1e-4), part
    # masking false negatives removes terms from the denominators: the InfoNCE values can only go down
    assert b["intra"] < a["intra"] and b["bm"] < a["bm"]
    clean = distinct_batch(small2)
    assert loss_parts(keep, clean) == pytest.approx(loss_parts(mask, clean), rel=1e-6)


def test_recon_observed_only_ignores_the_rows_of_missing_items(small2):
    batch = first_batch(small2)
    for observed_only in (False, True):
        model = build(small2, recon_observed_only=observed_only)
        before = loss_parts(model, batch)["recon"]
        with torch.no_grad():  # missing items are isolated in the graphs: observed rows do not see this
            for j, x in enumerate(model.features):
                x[~model.observed[:, j]] += 5.0
        after = loss_parts(model, batch)["recon"]
        if observed_only:
            assert after == pytest.approx(before, rel=1e-6)
        else:
            assert after > 2 * before


def test_recon_target_original_keeps_the_original_features(small2):
    table_model, original_model = build(small2), build(small2, recon_target="original")
    for model in (table_model, original_model):
        start = tables(model)
        torch.manual_seed(1)
        model.before_epoch(0)  # writes generated rows into the tables
        for j in range(model.M):
            rows, target = model._recon_target(j)
            assert not torch.equal(model.features[j].detach(), start[j])
            if model is original_model:
                assert torch.equal(rows, model.observed[:, j]) and torch.equal(target, start[j])
            else:  # the drifting, partly generated table, every row
                assert rows is None and target is model.features[j]


# ------------------------------------------------------------------------------- generation and graphs


@pytest.mark.parametrize("policy", ["only_missing_m", "any_missing_with_one_observed", "all_missing"])
def test_write_policy_selects_the_generated_rows(small3, policy):
    model = build(small3, write_policy=policy)
    before = tables(model)
    torch.manual_seed(1)
    model.before_epoch(0)
    want = missing_sets(small3)[policy]
    for j, rows in enumerate(changed_rows(before, tables(model))):
        np.testing.assert_array_equal(rows, np.flatnonzero(want[:, j]))
    # the three policies differ on these data
    sets = missing_sets(small3)
    assert sets["only_missing_m"].sum() < sets["any_missing_with_one_observed"].sum() < sets["all_missing"].sum()


def test_write_policy_none_generates_nothing(small2):
    """The ablation "w/o Generation": no row of any table changes and no graph is refreshed."""
    model = build(small2, write_policy="none", refresh_interval=1)
    before, graphs = tables(model), list(model.train_graphs)
    model.before_epoch(0)
    assert all(len(rows) == 0 for rows in changed_rows(before, tables(model)))
    assert all(a is b for a, b in zip(graphs, model.train_graphs, strict=True))


@pytest.mark.parametrize(("data", "option", "kind"), [
    ("small2", "auto", "all_missing"), ("small3", "auto", "only_missing_m"),
    ("small3", "all_missing_m", "all_missing"), ("small2", "only_missing_m", "only_missing_m")])
def test_refresh_rows_selects_the_refreshed_graph_rows(data, option, kind, request):
    ds = request.getfixturevalue(data)
    model = build(ds, refresh_rows=option, refresh_interval=1)
    initial = list(model.train_graphs)
    torch.manual_seed(1)
    model.before_epoch(0)  # the first pre-epoch step refreshes with refresh_interval 1
    want = missing_sets(ds)[kind]
    for j, (old, new) in enumerate(zip(initial, model.train_graphs, strict=True)):
        np.testing.assert_array_equal(graph_rows_changed(old, new), np.flatnonzero(want[:, j]))


def test_no_refresh_with_avg_lambda_zero(small2):
    model = build(small2, refresh_interval=1, avg_lambda=0.0)
    initial = list(model.train_graphs)
    model.before_epoch(0)
    assert all(a is b for a, b in zip(initial, model.train_graphs, strict=True))


def test_infer_graph_refreshed_scores_with_the_refreshed_graphs(small2):
    models = {opt: build(small2, infer_graph=opt, refresh_interval=1) for opt in ("initial", "refreshed")}
    reps = {}
    for opt, model in models.items():
        initial = list(model.infer_graphs)
        torch.manual_seed(1)
        model.before_epoch(0)
        scoring = model._scoring_graphs()
        assert all(g is h for g, h in zip(scoring, initial if opt == "initial" else model.train_graphs, strict=True))
        with torch.no_grad():
            reps[opt] = model.final_embeddings()[1]
    assert graph_rows_changed(models["refreshed"].infer_graphs[0], models["refreshed"].train_graphs[0]).size
    assert not torch.allclose(reps["initial"], reps["refreshed"])


def test_missing_source_policy_observed_mean_replaces_missing_sources(small2):
    """For target m, the source is the other modality: items missing it all get the same translated part."""
    for policy in ("table", "observed_mean"):
        model = build(small2, missing_source_policy=policy, generation_space="raw")
        torch.manual_seed(1)
        model.before_epoch(0)  # generated rows make the table's rows of missing items differ
        inputs, d = model.generation_inputs(), model.d
        for j, m in enumerate(small2.modalities):
            source_missing = ~small2.observed[:, 1 - j]
            translated = inputs[m][source_missing, :d]
            spread = float((translated - translated.mean(0)).abs().max())
            if policy == "observed_mean":
                assert spread < 1e-6
            else:
                assert spread > 1e-3


def _propagate(model: DGMRec, j: int, x: torch.Tensor) -> torch.Tensor:
    graph = model._scoring_graphs()[j]
    for _ in range(model.n_mm_layers):
        x = graph @ x
    return x


@pytest.mark.parametrize("space", ["reference", "propagated", "raw"])
def test_generation_space_selects_the_features_generated_from(small2, space):
    model = build(small2, generation_space=space)
    got = model.generation_inputs()
    with torch.no_grad():
        f = model.forward_all(model._scoring_graphs())
        for j, m in enumerate(small2.modalities):
            general = f["g"] if space == "propagated" else f["raw_g"]  # translator input
            gen_g = model.translator[j](general[1 - j])
            gen_s = model.specific_generator[j](f["filter"][j])
            if space == "reference":  # the generated parts are propagated before decoding
                gen_g, gen_s = _propagate(model, j, gen_g), _propagate(model, j, gen_s)
            torch.testing.assert_close(got[m], torch.cat([gen_g, gen_s], dim=1))
            # the decoder reconstructs from the same space
            prefix = "raw_" if space == "raw" else ""
            torch.testing.assert_close(model._decoder_input(f, j), torch.cat([f[prefix + "g"][j], f[prefix + "s"][j]],
                                                                             dim=1))


@pytest.mark.parametrize("fit", ["gradient", "least_squares", "least_squares_generated"])
def test_decoder_fit_trains_or_solves_the_decoder(small2, fit):
    model = build(small2, decoder_fit=fit, generation_space="raw")
    in_optimizer = {id(p) for g in model.optimizer_groups() for p in g["params"]}
    assert all((id(p) in in_optimizer) == (fit == "gradient") for p in model.decoder.parameters())
    before = [d.weight.detach().clone() for d in model.decoder]
    model.generation_inputs()  # a least-squares fit solves the decoders here
    moved = [not torch.equal(b, d.weight) for b, d in zip(before, model.decoder, strict=True)]
    assert moved == [fit != "gradient"] * model.M


# ---------------------------------------------------------------------------------------- new items


@pytest.mark.parametrize("option", ["auto", "new"])
def test_new_item_generation_selects_the_rows_written_at_evaluation(small3_new, option):
    model = build(small3_new, new_item_generation=option)
    before = tables(model)
    torch.manual_seed(1)
    model.before_evaluation(0)
    new = small3_new.new_items
    items = ~new if option == "auto" else new  # auto: the reference's three-modality path writes old items
    want = missing_sets(small3_new)["only_missing_m"] & items[:, None]
    for j, rows in enumerate(changed_rows(before, tables(model))):
        np.testing.assert_array_equal(rows, np.flatnonzero(want[:, j]))
        assert len(rows)


@pytest.mark.parametrize("update", [0, 1])
def test_infer_adj_update_refreshes_the_inference_graph_for_new_items(small3_new, update):
    model = build(small3_new, infer_adj_update=update, refresh_interval=1, new_item_generation="new")
    initial = list(model.infer_graphs)
    model.counter = 1
    torch.manual_seed(1)
    model.before_evaluation(0)
    missing_new = ~small3_new.observed & small3_new.new_items[:, None]
    for j, (old, now) in enumerate(zip(initial, model.infer_graphs, strict=True)):
        rows = graph_rows_changed(old, now)
        np.testing.assert_array_equal(rows, np.flatnonzero(missing_new[:, j]) if update else [])
