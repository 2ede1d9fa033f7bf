"""Items added to a trained run: recommendable at once, recorded, re-applied by load_run, checkpoint untouched."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from dgmrec import api
from dgmrec.cli import main
from dgmrec.data.mmrec import write_mmrec
from dgmrec.errors import InputError
from planted import make_planted


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """DGMRec trained on planted clusters (missing setting, cold_start knn), and the planted truth."""
    planted = make_planted(users_per_cluster=20, seed=7)
    folder = write_mmrec(planted.ds, tmp_path_factory.mktemp("data") / "planted")
    out = tmp_path_factory.mktemp("runs") / "dgmrec"
    api.train("DGMRec", folder, out=out, overrides={"epochs": 15, "learning_rate": 0.01, "cold_start": "knn"},
              progress=False)
    return planted, out


@pytest.fixture(scope="module")
def folders(small3, small2, tmp_path_factory):
    """small3 and small2 written as MMRec folders (runs rebuild their dataset from the folder)."""
    root = tmp_path_factory.mktemp("folders")
    return {"small3": write_mmrec(small3, root / "small3"), "small2": write_mmrec(small2, root / "small2")}


def fresh_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def cluster_items(planted, cluster: int, n: int, seed: int) -> dict[str, np.ndarray]:
    """New draws of items of ``cluster``: the mean observed row of its items plus a little noise."""
    ds, rng = planted.ds, np.random.default_rng(seed)
    out = {}
    for j, m in enumerate(ds.modalities):
        rows = (planted.item_cluster == cluster) & ds.observed[:, j]
        center = ds.features[m][rows].mean(0)
        out[m] = (center + 0.1 * rng.normal(size=(n, len(center)))).astype(np.float32)
    return out


def test_added_items_are_recommended_to_their_cluster(planted_run, tmp_path):
    planted, src = planted_run
    run = fresh_copy(src, tmp_path / "run")
    before = sha(run / "best.pt")
    feats = cluster_items(planted, cluster=2, n=6, seed=0)
    feats["image"][:3] = np.nan  # half of them without their first modality
    res = api.add_items(run, feats, item_ids=[f"a{i}" for i in range(6)])
    n_items = planted.ds.n_items
    assert res.items.tolist() == list(range(n_items, n_items + 6))
    rec = api.recommend(res.run, k=20)
    added = rec[rec.item >= n_items]
    assert len(added) > 0
    users = added.user.to_numpy()
    # mostly recommended to the users of cluster 2 (a quarter of the users)
    assert np.mean(planted.user_cluster[users] == 2) > 0.8
    # recorded, the checkpoint untouched, re-applied on load
    assert sha(run / "best.pt") == before
    folder = run / "added_items"
    assert (folder / "ids.txt").read_text().split() == [f"a{i}" for i in range(6)]
    np.testing.assert_array_equal(np.load(folder / "observed.npy")[:, 0], [False] * 3 + [True] * 3)
    assert np.isnan(np.load(folder / "image.npy")[:3]).all()
    generated = np.load(folder / "generated_image.npy")
    assert np.isfinite(generated).all()  # DGMRec generated the hidden modality
    np.testing.assert_allclose(generated[3:], feats["image"][3:], rtol=1e-5, atol=1e-5)
    again = api.load_run(run)
    assert again.dataset.n_items == n_items + 6 and again.added_ids == res.ids
    pd_again = api.recommend(again, k=20)
    np.testing.assert_array_equal(pd_again[["user", "item"]].to_numpy(), rec[["user", "item"]].to_numpy())
    # a second addition accumulates
    more = api.add_items(again, cluster_items(planted, cluster=0, n=2, seed=1))
    assert more.ids == [str(n_items + 6), str(n_items + 7)]
    assert len((folder / "ids.txt").read_text().split()) == 8
    assert api.load_run(run).dataset.n_items == n_items + 8
    assert sha(run / "best.pt") == before


def test_an_added_item_matches_the_same_item_present_as_new(folders, small3_new, tmp_path):
    # a new item at training time and the same features added afterwards get the same representation
    api.train("VBPR", folders["small3"], setting="new-items", out=tmp_path / "run",
              overrides={"epochs": 2, "cold_start": "knn"}, progress=False)
    lr = api.load_run(tmp_path / "run")
    new_item = int(np.flatnonzero(small3_new.new_items)[0])
    feats = {m: np.where(small3_new.observed[new_item, j], small3_new.features[m][new_item], np.nan)[None]
             for j, m in enumerate(small3_new.modalities)}
    res = api.add_items(lr, feats, out=tmp_path / "record")
    lr.model.prepare_eval()
    scores = lr.model.score_users(torch.arange(small3_new.n_users))
    torch.testing.assert_close(scores[:, res.items[0]], scores[:, new_item])
    # an out= record is re-applied when named
    assert api.load_run(tmp_path / "run").dataset.n_items == small3_new.n_items
    assert api.load_run(tmp_path / "run", added_items=tmp_path / "record").dataset.n_items == small3_new.n_items + 1


def test_reference_runs_and_content_score_added_items(folders, small2, tmp_path):
    # cold_start none (reference): added items still get a generated representation
    api.train("VBPR", folders["small2"], out=tmp_path / "vbpr", overrides={"epochs": 1}, progress=False)
    item = 5
    feats = {m: small2.features[m][[item]] for m in small2.modalities}
    res = api.add_items(tmp_path / "vbpr", feats)
    res.run.model.prepare_eval()
    s = res.run.model.score_users(torch.arange(small2.n_users))
    assert torch.isfinite(s[:, res.items[0]]).all() and s[:, res.items[0]].std() > 0
    # Content scores an added copy of an item exactly like the item
    api.train("Content", folders["small2"], out=tmp_path / "content", progress=False)
    feats = {m: np.where(small2.observed[item, j], small2.features[m][item], np.nan)[None]
             for j, m in enumerate(small2.modalities)}
    res = api.add_items(tmp_path / "content", feats)
    res.run.model.prepare_eval()
    s = res.run.model.score_users(torch.arange(small2.n_users))
    torch.testing.assert_close(s[:, res.items[0]], s[:, item])


@pytest.fixture(scope="module")
def lightgcn_and_vbpr(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    api.train("LightGCN", folders["small2"], out=root / "lightgcn", overrides={"epochs": 1}, progress=False)
    api.train("VBPR", folders["small2"], out=root / "vbpr", overrides={"epochs": 1}, progress=False)
    return root


@pytest.mark.parametrize("case, match", [
    (lambda d: {"image": np.zeros((2, d["image"] + 1))}, "shape"),
    (lambda d: {"video": np.zeros((2, 4))}, "unknown modality 'video'"),
    (lambda d: {"image": np.array([[np.nan] + [0.0] * (d["image"] - 1)])}, "partly NaN"),
    (lambda d: {"image": np.zeros((2, d["image"])), "text": np.zeros((3, d["text"]))}, "numbers of rows"),
    (lambda d: {"image": np.full((1, d["image"]), np.inf)}, "infinite"),
    (lambda d: {}, "no features"),
])
def test_bad_input_is_one_line(lightgcn_and_vbpr, small2, case, match):
    dims = {m: x.shape[1] for m, x in small2.features.items()}
    with pytest.raises(InputError, match=match) as err:
        api.add_items(lightgcn_and_vbpr / "vbpr", case(dims), out=lightgcn_and_vbpr / "unused")
    assert "\n" not in str(err.value)
    assert not (lightgcn_and_vbpr / "unused").exists()


def test_bad_ids_and_models_without_cold_path(lightgcn_and_vbpr, small2):
    feats = {"image": small2.features["image"][:2]}
    with pytest.raises(InputError, match="2 ids for"):
        api.add_items(lightgcn_and_vbpr / "vbpr", {"image": small2.features["image"][:1]}, item_ids=["a", "b"],
                      out=lightgcn_and_vbpr / "unused")
    with pytest.raises(InputError, match="already used"):
        api.add_items(lightgcn_and_vbpr / "vbpr", feats, item_ids=["a", "a"], out=lightgcn_and_vbpr / "unused")
    with pytest.raises(InputError, match="LightGCN cannot score items added") as err:
        api.add_items(lightgcn_and_vbpr / "lightgcn", feats)
    assert "\n" not in str(err.value)
    assert not (lightgcn_and_vbpr / "lightgcn" / "added_items").exists()


def test_cli_add_items(lightgcn_and_vbpr, small2, tmp_path, capsys):
    run = fresh_copy(lightgcn_and_vbpr / "vbpr", tmp_path / "run")
    np.save(tmp_path / "image_feat.npy", small2.features["image"][:3])
    (tmp_path / "ids.txt").write_text("x\ny\nz\n")
    main(["add-items", "--run", str(run), "--features", str(tmp_path / "image_feat.npy"), "--ids",
          str(tmp_path / "ids.txt")])
    assert "added 3 items" in capsys.readouterr().out
    assert (run / "added_items" / "ids.txt").read_text().split() == ["x", "y", "z"]
    np.save(tmp_path / "image_feat.npy", small2.features["image"][:3, :5])
    with pytest.raises(SystemExit) as exit_info:
        main(["add-items", "--run", str(run), "--features", str(tmp_path / "image_feat.npy")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "shape" in err and "\n" not in err
