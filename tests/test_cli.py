"""End-to-end CLI behaviour: training runs, resumption, recommend vs results, generation, bad input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from dgmrec.cli import main
from dgmrec.data.mmrec import write_mmrec
from dgmrec.data.synthetic import make_synthetic
from dgmrec.evaluation.metrics import metrics_from_hits


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "syn"
    write_mmrec(make_synthetic(n_users=150, n_items=100, interactions_per_user=12, seed=7, name="syn"), path)
    return path


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dgm"
    main(["train", "--model", "DGMRec", "--data", str(folder), "--out", str(out), "--set", "epochs=6",
          "--set", "train_batch_size=256", "-q"])
    return out


def test_train_writes_results(trained):
    res = json.loads((trained / "results.json").read_text())
    for key in ("model", "dataset", "seed", "best_epoch", "epochs_run", "seconds_per_epoch", "valid", "test",
                "config"):
        assert key in res
    assert res["model"] == "DGMRec" and res["dataset"] == "syn" and res["seed"] == 999
    assert "recall@20" in res["test"] and "ndcg@20" in res["test"]
    assert (trained / "best.pt").is_file() and (trained / "log.jsonl").is_file()
    assert (trained / "per_user_test.csv").is_file()


def test_recommend_reproduces_test_metrics(trained, folder, capsys):
    code, out, _ = run_cli(["recommend", "--run", str(trained), "--k", "20", "--exclude", "train"], capsys)
    assert code == 0
    recs = pd.read_csv(__import__("io").StringIO(out))
    inter = pd.read_csv(folder / "syn.inter", sep="\t")
    train_users = set(inter[inter.x_label == 0].userID)
    test = inter[(inter.x_label == 2) & inter.userID.isin(train_users)]
    truth = test.groupby("userID").itemID.apply(set)
    users = truth.index.to_numpy()
    top = recs.set_index(["user", "rank"]).item.unstack().loc[users].to_numpy()
    hits = np.array([[item in truth[u] for item in row] for u, row in zip(users, top, strict=True)])
    m = metrics_from_hits(hits, np.array([len(truth[u]) for u in users]), [20])
    res = json.loads((trained / "results.json").read_text())
    assert abs(m["recall@20"].mean() - res["test"]["recall@20"]) < 1e-4
    assert abs(m["ndcg@20"].mean() - res["test"]["ndcg@20"]) < 1e-4


def test_resume_gives_identical_metrics(folder, tmp_path):
    from dgmrec.api import load_dataset
    from dgmrec.config import resolve_config
    from model_checks import make_trainer

    ds = load_dataset(folder)
    cfg, _ = resolve_config("DGMRec", "syn", overrides={"epochs": 6, "train_batch_size": 256,
                                                        "refresh_interval": 2})
    full = make_trainer("DGMRec", ds, cfg, tmp_path / "full").fit().results
    killed = make_trainer("DGMRec", ds, cfg, tmp_path / "part")
    for _ in range(3):  # then the process dies
        killed.run_epoch()
    resumed = make_trainer("DGMRec", ds, cfg, tmp_path / "part").fit(resume=True).results
    assert resumed["test"] == full["test"] and resumed["best_epoch"] == full["best_epoch"]
    log = (tmp_path / "part" / "log.jsonl").read_text().splitlines()
    assert len(log) == 6


def test_generate_fills_missing_rows(trained, folder, tmp_path, capsys):
    code, _, _ = run_cli(["generate", "--run", str(trained), "--out", str(tmp_path / "gen")], capsys)
    assert code == 0
    original = np.load(folder / "image_feat.npy")
    generated = np.load(tmp_path / "gen" / "image_feat.npy")
    mask = np.load(tmp_path / "gen" / "observed.npz")["observed"]
    assert np.isfinite(generated).all()
    np.testing.assert_array_equal(generated[mask[:, 0]], original[mask[:, 0]])
    assert not np.allclose(generated[~mask[:, 0]], original[~mask[:, 0]])


def test_retrieval_command(trained, folder, tmp_path, capsys):
    code, _, _ = run_cli(["retrieval", "--run", str(trained), "--truth", str(folder), "--out",
                            str(tmp_path / "r.json")], capsys)
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert "generated_hit@10" in res["by_missing_level"]["1"] and "nn_hit@10" in res["by_missing_level"]["1"]
    assert res["similarity"] == "cosine" and res["chance"]["hit@10"] > 0
    bad(capsys, ["retrieval", "--run", str(trained), "--truth", str(folder), "--similarity", "dot"], "--similarity")
    # without --truth the run's own dataset (whose masked rows keep their features) is the truth
    code, _, _ = run_cli(["retrieval", "--run", str(trained), "--out", str(tmp_path / "own.json")], capsys)
    assert code == 0
    assert json.loads((tmp_path / "own.json").read_text())["by_missing_level"] == res["by_missing_level"]


# ------------------------------------------------------------------------------------------- bad input
def bad(capsys, args, needle):
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def copy_folder(folder, dst):
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_inputs(folder, trained, tmp_path, capsys):
    d = str(folder)
    out = str(tmp_path / "x")
    bad(capsys, ["train", "--model", "Nope", "--data", d, "--out", out], "known models")
    bad(capsys, ["train", "--model", "DGMRec", "--data", d, "--out", out, "--set", "nonsense=1"],
        "unknown configuration key 'nonsense'")
    bad(capsys, ["train", "--model", "DGMRec", "--data", d, "--out", out, "--set", "epochs=abc"],
        "must be an integer")
    bad(capsys, ["train", "--model", "DGMRec", "--data", d, "--out", out, "--set", "write_policy=bogus"],
        "write_policy")
    bad(capsys, ["train", "--model", "DGMRec", "--data", d, "--out", out, "--modalities", "image,smell"],
        "unknown modality 'smell'")
    bad(capsys, ["train", "--model", "DGMRec", "--data", str(tmp_path / "none"), "--out", out], "not found")
    bad(capsys, ["train", "--model", "DGMRec", "--data", d, "--out", out, "--set", "epochs=-1"],
        "key 'epochs' must be at least 1")
    bad(capsys, ["train", "--model", "DGMRec", "--data", "synthetic(seed=x)", "--out", out], "data: expected synthetic")
    # nothing to resume: an error, not a fresh run
    bad(capsys, ["train", "--model", "DGMRec", "--data", d, "--out", out, "--resume", "-q"], "--resume")
    assert not (tmp_path / "x").exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: [1, 2\n")
    bad(capsys, ["train", "--model", "DGMRec", "--data", d, "--out", out, "--config", str(cfg)], "not valid YAML")

    f = copy_folder(folder, tmp_path / "ids")
    inter = pd.read_csv(f / "syn.inter", sep="\t")
    inter.loc[0, "itemID"] = 10_000
    inter.to_csv(f / "syn.inter", sep="\t", index=False)
    bad(capsys, ["data", "check", str(f)], "out of range")

    f = copy_folder(folder, tmp_path / "cols")
    inter.drop(columns=["x_label"]).to_csv(f / "syn.inter", sep="\t", index=False)
    bad(capsys, ["data", "check", str(f)], "missing column")

    f = copy_folder(folder, tmp_path / "nan")
    x = np.load(f / "text_feat.npy")
    x[3, 0] = np.nan
    np.save(f / "text_feat.npy", x)
    bad(capsys, ["data", "check", str(f)], "row 3 contains NaN")

    evil = tmp_path / "evil.npy"
    with evil.open("wb") as fh:
        pickle.dump({"t": __import__("collections").OrderedDict()}, fh)
    bad(capsys, ["data", "check", d, "--mask", str(evil)], "only NumPy arrays and dicts")
    keys = tmp_path / "keys.npy"
    np.save(keys, {"q": np.array([1])}, allow_pickle=True)
    bad(capsys, ["data", "check", d, "--mask", str(keys)], "mask key letter 'q'")
    ids = tmp_path / "ids.npy"
    np.save(ids, {"t": np.array([5000])}, allow_pickle=True)
    bad(capsys, ["data", "check", d, "--mask", str(ids)], "out of range")

    # a checkpoint from another dataset
    other = tmp_path / "other"
    write_mmrec(make_synthetic(n_users=150, n_items=100, interactions_per_user=12, seed=8, name="syn"), other)
    bad(capsys, ["train", "--model", "DGMRec", "--data", str(other), "--out", str(trained), "--resume", "-q"],
        "another dataset")


def test_demo_runs_end_to_end(tmp_path, capsys):
    code, out, _ = run_cli(["demo", "--epochs", "2", "--out", str(tmp_path / "demo")], capsys)
    assert code == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["test"]) == {"DGMRec", "LightGCN", "MFBPR"}
    assert "Hit@10" in out and summary["retrieval"]["by_missing_level"]["1"]["nn_hit@10"] > 0
