"""Data layer: MMRec folders, masks (pickled and plain), NaN rows, raw interactions, generators."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pandas as pd
import pytest

from dgmrec.data.impute import impute_features
from dgmrec.data.masks import (
    generate_missing_mask,
    load_pickled_mask_dict,
    mask_from_key_dict,
    mask_to_key_dict,
    read_mask_file,
    save_plain_mask,
)
from dgmrec.data.mmrec import load_mmrec, write_mmrec
from dgmrec.data.raw import chronological_labels, read_raw_interactions
from dgmrec.data.synthetic import make_synthetic
from dgmrec.errors import DataError


def write_folder(path, name="toy", n_users=6, n_items=8, feats=(("image", 4), ("text", 3)), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=5, replace=False)
        rows += [(u, int(i), lab) for i, lab in zip(items, [0, 0, 0, 1, 2], strict=True)]
    pd.DataFrame(rows, columns=["userID", "itemID", "x_label"]).to_csv(path / f"{name}.inter", sep="\t", index=False)
    for m, d in feats:
        np.save(path / f"{m}_feat.npy", rng.random((n_items, d)).astype(np.float16))
    return path


def test_load_mmrec_reads_float16_and_orders_modalities(tmp_path):
    ds = load_mmrec(write_folder(tmp_path))
    assert ds.name == "toy" and ds.modalities == ["image", "text"]
    assert ds.features["image"].dtype == np.float32
    assert ds.observed.all()
    assert len(ds.train) == 18 and len(ds.valid) == 6 and len(ds.test) == 6


def test_nan_rows_become_missing(tmp_path):
    write_folder(tmp_path)
    x = np.load(tmp_path / "text_feat.npy").astype(np.float32)
    x[[1, 4]] = np.nan
    np.save(tmp_path / "text_feat.npy", x)
    ds = load_mmrec(tmp_path)
    assert np.flatnonzero(~ds.observed[:, 1]).tolist() == [1, 4]
    imputed = impute_features(ds.features, ds.observed, "mean")
    np.testing.assert_allclose(imputed["text"][1], x[ds.observed[:, 1]].mean(0), rtol=1e-5)


def test_pickled_mask_two_and_three_letter_keys(tmp_path):
    groups = {"t": np.array([0, 1]), "v": np.array([2]), "a": np.array([3]), "tv": np.array([4]),
              "va": np.array([5]), "all": np.array([6])}
    path = tmp_path / "mask.npy"
    np.save(path, groups, allow_pickle=True)
    loaded = load_pickled_mask_dict(path, 8)
    assert set(loaded) == set(groups)
    obs = mask_from_key_dict(loaded, 8, ["image", "audio"])  # text letter ignored: not a modality here
    assert obs[:, 0].tolist() == [1, 1, 0, 1, 0, 0, 0, 1]  # image missing: v, tv, va, all
    assert obs[:, 1].tolist() == [1, 1, 1, 0, 1, 0, 0, 1]  # audio missing: a, va, all
    back = mask_to_key_dict(obs, ["image", "audio"])
    assert mask_from_key_dict(back, 8, ["image", "audio"]).tolist() == obs.tolist()


def test_malicious_pickle_is_rejected_without_running(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.npy"
    with path.open("wb") as f:
        pickle.dump({"t": Evil()}, f)
    with pytest.raises(DataError, match="only NumPy arrays and dicts"):
        load_pickled_mask_dict(path, 8)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("groups, message", [
    ({"x": np.array([0])}, "mask key letter 'x' has no modality"),
    ({"tt": np.array([0])}, "unknown mask key 'tt'"),
    ({"t": np.array([9])}, "item id 9 out of range 0..3"),
    ({"t": np.array([-1])}, "item id -1 out of range 0..3"),
    ({"t": np.array([1]), "v": np.array([1])}, "another key also lists"),
], ids=["letter", "key", "id-too-large", "id-negative", "listed-twice"])
def test_bad_mask_keys_and_ids(groups, message):
    with pytest.raises(DataError, match=re.escape(message)):
        mask_from_key_dict(groups, 4, ["image", "text"], source="m.npy")


# --------------------------------------------------------------------------- pickled mask reader: caps
N_ITEMS = 100


def _nested_bomb() -> object:
    """A list of 2**21 zeros as 21 levels of ``[x, x]``: under 200 bytes pickled (shared references)."""
    x: object = 0
    for _ in range(21):
        x = [x, x]
    return x


def _pickled(path, obj) -> str:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=4)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("nested-list-bomb", "nested list"),
    ("nested-array", r"nested \(2-D\) array"),
    ("nested-in-object-array", "nested list"),
    ("id-out-of-range", "item id 100 out of range 0..99"),
    ("negative-id", "item id -3 out of range 0..99"),
    ("more-ids-than-items", "more item ids"),
    ("long-list", "lists 101 ids, more than there are items"),
    ("file-too-large", "bytes, more than a mask of 100 items needs"),
    ("float-ids", "holds float64 values"),
    ("scalar", "holds a int, expected a list or array"),
    ("not-a-dict", "holds a list, expected a dict"),
    ("key-not-a-string", "is not a string"),
    ("truncated", "not a valid mask pickle"),
])
def test_pickled_mask_reader_rejects(tmp_path, case, message):
    path = tmp_path / "mask.npy"
    if case == "nested-list-bomb":
        src = _pickled(path, {"t": _nested_bomb()})
        assert path.stat().st_size < 200  # and yet two million ids once expanded
    elif case == "nested-array":
        src = str(path)
        np.save(path, {"t": np.zeros((3, 2), dtype=np.int64)}, allow_pickle=True)
    elif case == "nested-in-object-array":
        src = str(path)
        np.save(path, {"t": np.array([[1, 2], [3]], dtype=object)}, allow_pickle=True)
    elif case == "id-out-of-range":
        src = _pickled(path, {"t": np.array([3, N_ITEMS])})
    elif case == "negative-id":
        src = _pickled(path, {"t": [1, -3]})
    elif case == "more-ids-than-items":  # every key small, together more than the catalogue
        src = _pickled(path, {"t": np.arange(60), "v": np.arange(60)})
    elif case == "long-list":
        src = _pickled(path, {"t": [0] * (N_ITEMS + 1)})
    elif case == "file-too-large":
        src = str(path)
        np.save(path, {"t": np.arange(N_ITEMS), "junk": "x" * (1 << 17)}, allow_pickle=True)
    elif case == "float-ids":
        src = _pickled(path, {"t": np.array([1.0, 2.0])})
    elif case == "scalar":
        src = _pickled(path, {"t": 5})
    elif case == "not-a-dict":
        src = _pickled(path, [np.array([1])])
    elif case == "key-not-a-string":
        src = _pickled(path, {1: np.array([1])})
    else:
        src = str(path)
        path.write_bytes(pickle.dumps({"t": np.arange(5)})[:-10])
    with pytest.raises(DataError) as exc:
        load_pickled_mask_dict(path, N_ITEMS)
    text = str(exc.value)
    assert text.startswith(f"{src}: ") and "\n" not in text, text
    assert re.search(message, text), text


def test_pickled_mask_reader_accepts_lists_tuples_and_empty_keys(tmp_path):
    path = tmp_path / "mask.npy"
    np.save(path, {"t": [0, 5], "v": (np.int64(7),), "all": np.array([], dtype=np.float64)}, allow_pickle=True)
    loaded = load_pickled_mask_dict(path, 8)
    assert {k: v.tolist() for k, v in loaded.items()} == {"t": [0, 5], "v": [7], "all": []}
    assert all(v.dtype == np.int64 for v in loaded.values())


def test_mask_file_caps_follow_the_dataset(tmp_path):
    """``read_mask_file`` (and so ``load_mmrec``) caps by the dataset's catalogue."""
    path = tmp_path / "mask.npy"
    np.save(path, {"t": np.array([7])}, allow_pickle=True)
    assert not read_mask_file(path, 8, ["image", "text"])[7, 1]
    with pytest.raises(DataError, match=re.escape("item id 7 out of range 0..6")):
        read_mask_file(path, 7, ["image", "text"])


def test_plain_mask_roundtrip(tmp_path):
    obs = np.array([[1, 0], [1, 1], [0, 0]], dtype=bool)
    save_plain_mask(tmp_path / "m.npz", obs, ["image", "text"])
    assert read_mask_file(tmp_path / "m.npz", 3, ["text", "image"]).tolist() == obs[:, ::-1].tolist()


def test_generated_mask_follows_the_recipe():
    counts = np.arange(600)
    obs2 = generate_missing_mask(counts, 2, 2 / 3, seed=1)
    miss2 = (~obs2).sum(1)
    assert abs((miss2 > 0).mean() - 2 / 3) < 0.01
    assert abs((miss2 == 2).mean() - 1 / 3) < 0.01  # half of the missing items miss both
    assert abs((~obs2[:, 0]).mean() - 0.5) < 0.01  # each modality missing for half the items
    obs3 = generate_missing_mask(counts, 3, 0.6, seed=1)
    miss3 = (~obs3).sum(1)
    for level in (1, 2, 3):
        assert abs((miss3 == level).mean() - 0.2) < 0.01
    np.testing.assert_array_equal(obs3, generate_missing_mask(counts, 3, 0.6, seed=1))


def test_new_items_setting_generated(tmp_path):
    ds = load_mmrec(write_folder(tmp_path, n_users=30, n_items=20), setting="new-items")
    assert ds.new_items is not None and ds.new_items.sum() == 4
    assert not ds.new_items[ds.train[:, 1]].any()
    assert ds.new_items[ds.test_new_only[:, 1]].all()


def test_chronological_split_per_user():
    users = np.array([0] * 10 + [1] * 2)
    ts = np.array([9, 1, 2, 3, 4, 5, 6, 7, 8, 0, 5, 1])
    labels = chronological_labels(users, ts)
    assert labels[0] == 2 and labels[8] == 1  # latest -> test, second latest -> valid
    assert (labels[:10] == 0).sum() == 8
    assert labels[10:].tolist() == [0, 0]  # fewer than 3 interactions: all training


def test_raw_interactions_with_string_ids(tmp_path):
    df = pd.DataFrame({"user": ["b", "a", "a", "a", "b", "b"], "item": ["x", "y", "z", "x", "y", "z"],
                       "timestamp": ["2020-01-03", "2020-01-01", "2020-01-02", "2020-01-05", "2020-01-01",
                                     "2020-01-02"]})
    df.to_csv(tmp_path / "raw.csv", index=False)
    raw = read_raw_interactions(tmp_path / "raw.csv")
    assert raw.user_ids.tolist() == ["a", "b"] and raw.item_ids.tolist() == ["x", "y", "z"]
    # user a: y (01-01) train, z (01-02) valid, x (01-05) test
    a_rows = raw.users == 0
    got = dict(zip(raw.item_ids[raw.items[a_rows]], raw.labels[a_rows], strict=True))
    assert got == {"y": 0, "z": 1, "x": 2}


@pytest.mark.parametrize("content, message", [
    ("userID\titemID\n0\t1\n", "missing column"),
    ("userID\titemID\tx_label\n0\tabc\t0\n", "not an integer"),
    ("userID\titemID\tx_label\n-1\t1\t0\n", "negative id"),
    ("userID\titemID\tx_label\n0\t1\t7\n", "is not 0, 1 or 2"),
])
def test_malformed_inter(tmp_path, content, message):
    write_folder(tmp_path)
    (tmp_path / "toy.inter").write_text(content)
    with pytest.raises(DataError, match=message):
        load_mmrec(tmp_path)


@pytest.mark.parametrize("case, message", [
    ("rows", "has 5 rows but image_feat.npy has 8"),
    ("inf", "row 2 contains inf"),
    ("partial-nan", "row 2 contains NaN"),
    ("dims", "2-D"),
    ("dtype", "not a plain numeric"),
])
def test_feature_rows_and_values_are_checked(tmp_path, case, message):
    write_folder(tmp_path)
    x = np.ones((8, 3), dtype=np.float32)
    if case == "rows":
        x = x[:5]
    elif case == "inf":
        x[2, 1] = np.inf
    elif case == "partial-nan":
        x[2, 1] = np.nan
    elif case == "dims":
        x = x[:, 0]
    else:
        x = np.array([{"a": 1}] * 8, dtype=object)
    np.save(tmp_path / "text_feat.npy", x, allow_pickle=True)
    with pytest.raises(DataError, match=message) as exc:
        load_mmrec(tmp_path)
    assert str(exc.value).startswith(str(tmp_path / "text_feat.npy"))


def test_write_and_read_back(tmp_path):
    ds = make_synthetic(n_users=50, n_items=40, seed=1)
    write_mmrec(ds, tmp_path / "syn")
    back = load_mmrec(tmp_path / "syn")
    np.testing.assert_array_equal(back.observed, ds.observed)
    np.testing.assert_array_equal(back.train, ds.train)
    np.testing.assert_allclose(back.features["text"], ds.features["text"])


def test_synthetic_is_deterministic():
    a, b = make_synthetic(seed=5, n_users=60, n_items=50), make_synthetic(seed=5, n_users=60, n_items=50)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.features["audio"], b.features["audio"])
