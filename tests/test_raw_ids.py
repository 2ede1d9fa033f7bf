"""Original (raw) user and item ids end to end: id maps in the data layer, recommend, generate, retrieval."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import dgmrec
from dgmrec.cli import main
from dgmrec.data.mmrec import load_mmrec, write_mmrec
from dgmrec.data.synthetic import make_synthetic
from dgmrec.errors import DataError
from test_cli import bad, run_cli

N_USERS, N_ITEMS = 50, 30
# internal index i is the user "user_<PERM[i]>": a mix-up of index and id cannot pass unnoticed
PERM = np.random.default_rng(11).permutation(N_USERS)
USER_IDS = np.array([f"user_{p}" for p in PERM])
ITEM_IDS = np.array([f"SKU{(7 * i) % N_ITEMS:03d}" for i in range(N_ITEMS)])


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    ds = make_synthetic(n_users=N_USERS, n_items=N_ITEMS, interactions_per_user=8, seed=5, name="shop",
                        modalities=(("image", 12), ("text", 8)))
    folder = tmp_path_factory.mktemp("data") / "shop"
    write_mmrec(replace(ds, user_ids=USER_IDS, item_ids=ITEM_IDS), folder)
    return folder


@pytest.fixture(scope="module")
def run(shop, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dgm"
    main(["train", "--model", "DGMRec", "--data", str(shop), "--out", str(out), "--set", "epochs=2",
          "--set", "train_batch_size=128", "-q"])
    return out


def recs_of(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), dtype={"user": str, "item": str})


# ------------------------------------------------------------------------------------------ data layer
def test_folder_id_maps_are_loaded(shop):
    ds = load_mmrec(shop)
    np.testing.assert_array_equal(ds.user_ids, USER_IDS)
    np.testing.assert_array_equal(ds.item_ids, ITEM_IDS)
    assert list(ds.user_index(["user_3"])) == [int(np.flatnonzero(USER_IDS == "user_3")[0])]


def test_id_map_rows_in_any_order_are_put_in_index_order(shop, tmp_path):
    folder = shutil.copytree(shop, tmp_path / "shuffled")
    table = pd.read_csv(folder / "user_ids.csv", dtype=str)
    table.sample(frac=1.0, random_state=0).to_csv(folder / "user_ids.csv", index=False)
    np.testing.assert_array_equal(load_mmrec(folder).user_ids, USER_IDS)


@pytest.mark.parametrize(("file", "content", "needle"), [
    ("user_ids.csv", "user,original_id\n", "missing column(s) userID"),
    ("item_ids.csv", "itemID,name\n", "missing column(s) original_id"),
    ("user_ids.csv", "userID,original_id\n" + "".join(f"{i},u{i % 3}\n" for i in range(N_USERS)),
     "original id 'u0' appears twice"),
    ("item_ids.csv", "itemID,original_id\n" + "".join(f"{i},i{i}\n" for i in range(N_ITEMS - 1)),
     f"has {N_ITEMS - 1} rows but the dataset has {N_ITEMS} items"),
    ("item_ids.csv", "itemID,original_id\n" + "".join(f"{i + 1},i{i}\n" for i in range(N_ITEMS)),
     f"column itemID must hold 0..{N_ITEMS - 1} once each"),
    ("user_ids.csv", "userID,original_id\n" + "".join(f"{2 * i},u{i}\n" for i in range(N_USERS)),
     f"column userID must hold 0..{N_USERS - 1} once each"),
])
def test_bad_id_map_is_an_error_naming_the_file(shop, tmp_path, file, content, needle):
    folder = shutil.copytree(shop, tmp_path / "bad")
    (folder / file).write_text(content)
    with pytest.raises(DataError) as exc:
        load_mmrec(folder)
    assert str(exc.value).startswith(str(folder / file)) and needle in str(exc.value)


def test_run_rebuilds_the_id_maps_from_its_spec(run):
    ds = dgmrec.load_run(run).dataset
    np.testing.assert_array_equal(ds.user_ids, USER_IDS)
    np.testing.assert_array_equal(ds.item_ids, ITEM_IDS)


# --------------------------------------------------------------------------------------------- recommend
def test_api_recommend_takes_and_returns_original_ids(run):
    raw = dgmrec.recommend(run, users=["user_7", "user_0"], k=5)
    index = [int(np.flatnonzero(u == USER_IDS)[0]) for u in ("user_7", "user_0")]
    internal = dgmrec.recommend(run, users=index, k=5, ids="internal")
    assert list(raw["user"]) == ["user_7"] * 5 + ["user_0"] * 5
    assert list(raw["item"]) == list(ITEM_IDS[internal["item"].to_numpy()])
    np.testing.assert_allclose(raw["score"], internal["score"])


@pytest.mark.parametrize(("form", "expected"), [
    ("user_3", ["user_3"]),
    ("user_3,user_12, user_40", ["user_3", "user_12", "user_40"]),
    ("file:user_0\nuser_5\n", ["user_0", "user_5"]),  # no header: the first line is a user
    ("file:user\nuser_0\nuser_5\n", ["user_0", "user_5"]),
    ("file:original_id,note\r\nuser_9,vip\r\n\r\nuser_2,\r\n", ["user_9", "user_2"]),
])
def test_cli_recommend_users_inline_or_file(run, tmp_path, capsys, form, expected):
    value = form
    if form.startswith("file:"):
        value = str(tmp_path / "users.csv")
        (tmp_path / "users.csv").write_text(form[len("file:"):])
    code, out, err = run_cli(["recommend", "--run", str(run), "--users", value, "--k", "3"], capsys)
    assert code == 0, err
    recs = recs_of(out)
    assert list(dict.fromkeys(recs["user"])) == expected
    assert set(recs["item"]) <= set(ITEM_IDS) and len(recs) == 3 * len(expected)


@pytest.mark.parametrize(("form", "needle"), [
    ("user_99", "--users: unknown user 'user_99'"),
    ("user_1,nobody,ghost", "--users: unknown user 'nobody' (and 1 more)"),
    ("users.txt", "--users: unknown user 'users.txt', and no file of that name"),
    ("file:user_1\nuser_99\n", "unknown user 'user_99'"),
    ("file:user\n", "no user ids in the file"),
    ("file:", "no user ids in the file"),
    (" , ", "--users: no user ids given"),
])
def test_unknown_or_missing_users_are_one_line_errors(run, tmp_path, capsys, form, needle):
    value = form
    if form.startswith("file:"):
        value = str(tmp_path / "users.csv")
        (tmp_path / "users.csv").write_text(form[len("file:"):])
    bad(capsys, ["recommend", "--run", str(run), "--users", value], needle)


def test_internal_ids_flag_speaks_indices(run, capsys):
    code, out, _ = run_cli(["recommend", "--run", str(run), "--users", "4,0", "--k", "2", "--internal-ids"],
                           capsys)
    assert code == 0
    recs = pd.read_csv(io.StringIO(out))
    assert list(recs["user"]) == [4, 4, 0, 0] and recs["item"].between(0, N_ITEMS - 1).all()
    bad(capsys, ["recommend", "--run", str(run), "--users", "user_4", "--internal-ids"],
        "unknown user 'user_4' (internal user indices are 0..49)")


def test_recommend_out_writes_csv(run, tmp_path, capsys):
    target = tmp_path / "recs" / "top.csv"
    code, out, _ = run_cli(["recommend", "--run", str(run), "--users", "user_1,user_2", "--k", "4", "--out",
                            str(target)], capsys)
    assert code == 0 and "8 recommendations for 2 users" in out
    recs = pd.read_csv(target, dtype={"user": str, "item": str})
    assert list(recs.columns) == ["user", "rank", "item", "score"]
    assert list(recs["rank"]) == [1, 2, 3, 4] * 2 and set(recs["item"]) <= set(ITEM_IDS)


def test_recommend_excludes_seen_items_by_original_id(run, shop):
    ds = load_mmrec(shop)
    recs = dgmrec.recommend(run, users=["user_5"], k=N_ITEMS)
    u = int(np.flatnonzero(USER_IDS == "user_5")[0])
    seen = np.concatenate([ds.train, ds.valid, ds.test])
    seen_items = set(ITEM_IDS[seen[seen[:, 0] == u, 1]])
    assert seen_items and not seen_items & set(recs["item"])
    assert len(recs) == N_ITEMS - len(seen_items)


# ------------------------------------------------------------------------------------ generate, retrieval
def test_generate_writes_the_id_maps(run, shop, tmp_path, capsys):
    code, _, _ = run_cli(["generate", "--run", str(run), "--out", str(tmp_path / "gen")], capsys)
    assert code == 0
    for name in ("user_ids.csv", "item_ids.csv"):
        assert (tmp_path / "gen" / name).read_text() == (shop / name).read_text()
    np.testing.assert_array_equal(load_mmrec(tmp_path / "gen").item_ids, ITEM_IDS)


def test_retrieval_names_the_missing_items_by_original_id(run, shop):
    ds = load_mmrec(shop)
    res = dgmrec.api.retrieval(run)
    for j, m in enumerate(ds.modalities):
        assert res["missing_items"][m] == list(ITEM_IDS[~ds.observed[:, j]])


def test_retrieval_truth_folder_is_aligned_by_item_id(run, shop, tmp_path):
    truth = tmp_path / "truth"
    truth.mkdir()
    order = np.random.default_rng(2).permutation(N_ITEMS)  # truth row r holds item order[r]
    for m in ("image", "text"):
        np.save(truth / f"{m}_feat.npy", np.load(shop / f"{m}_feat.npy")[order])
    pd.DataFrame({"itemID": np.arange(N_ITEMS), "original_id": ITEM_IDS[order]}).to_csv(truth / "item_ids.csv",
                                                                                        index=False)
    aligned = dgmrec.api.retrieval(run, truth)
    own = dgmrec.api.retrieval(run)
    assert json.dumps(aligned["by_missing_level"], sort_keys=True) == json.dumps(own["by_missing_level"],
                                                                                   sort_keys=True)
    pd.DataFrame({"itemID": np.arange(N_ITEMS), "original_id": [f"X{i}" for i in range(N_ITEMS)]}).to_csv(
        truth / "item_ids.csv", index=False)
    with pytest.raises(DataError, match="not the run's items"):
        dgmrec.api.retrieval(run, truth)
