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


# ------------------------------------------------------------------------------------------ run directories
def small_train(data, out, *extra):
    return ["train", "--model", "LightGCN", "--data", str(data), "--out", str(out), "--set", "epochs=2", "-q",
            *extra]


def test_train_refuses_a_directory_that_holds_a_run(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(small_train(folder, out), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad(capsys, small_train(folder, out, "--set", "epochs=3"),
        f"error: --out: {out} already holds a run; use --resume or --overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the first run is intact


def test_train_overwrite_replaces_the_run(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(small_train(folder, out), capsys)[0] == 0
    (out / "per_user_test_new_items.csv").write_text("stale")  # a file of the old run only
    code, _, err = run_cli(small_train(folder, out, "--set", "epochs=3", "--overwrite"), capsys)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["epochs_run"] == 3
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert not (out / "per_user_test_new_items.csv").exists()


def test_overwrite_keeps_the_run_when_the_configuration_is_bad(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(small_train(folder, out), capsys)[0] == 0
    results = (out / "results.json").read_bytes()
    bad(capsys, small_train(folder, out, "--set", "epochs=0", "--overwrite"), "key 'epochs' must be at least 1")
    assert (out / "results.json").read_bytes() == results


def test_resume_and_overwrite_together_is_an_error(folder, tmp_path, capsys):
    bad(capsys, small_train(folder, tmp_path / "run", "--resume", "--overwrite"), "--out: use --resume or --overwrite")


# --------------------------------------------------------------------------------- catalogues of any shape
def featureless(folder, dst):
    dst.mkdir()
    for f in folder.iterdir():
        if not f.name.endswith("_feat.npy") and f.name != "observed.npz":
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("model", ["LightGCN", "MFBPR"])
def test_models_without_features_train_on_a_folder_without_feature_files(folder, tmp_path, capsys, model):
    data = featureless(folder, tmp_path / "ids-only")
    code, _out, err = run_cli(["train", "--model", model, "--data", str(data), "--out", str(tmp_path / "r"),
                              "--set", "epochs=3", "-q"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["modalities"] == [] and res["test"]["recall@20"] > 0
    assert run_cli(["recommend", "--run", str(tmp_path / "r"), "--users", "0", "--k", "3"], capsys)[0] == 0


def test_a_model_that_needs_features_says_so_on_a_folder_without_them(folder, tmp_path, capsys):
    data = featureless(folder, tmp_path / "ids-only")
    bad(capsys, ["train", "--model", "DGMRec", "--data", str(data), "--out", str(tmp_path / "r")],
        "--data: DGMRec needs item features and the dataset has none")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """20 items: the default cut-offs 20 and 50 rank every item."""
    path = tmp_path_factory.mktemp("data") / "tiny"
    write_mmrec(make_synthetic(n_users=30, n_items=20, interactions_per_user=6, seed=4, name="tiny",
                               modalities=(("image", 8), ("text", 6))), path)
    return path


def test_small_catalogue_trains_with_default_cutoffs(tiny, tmp_path, capsys):
    code, _out, err = run_cli(["train", "--model", "LightGCN", "--data", str(tiny), "--out", str(tmp_path / "r"),
                              "--set", "epochs=2", "-q"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["config"]["topk"] == [10] and res["valid_metric"] == "recall@10"
    assert set(res["test"]) == {f"{m}@10" for m in ("recall", "ndcg", "precision", "map", "hit")}
    note = "topk [10, 20, 50] -> [10] and valid_metric recall@20 -> recall@10: the catalogue has 20 items"
    assert len(res["notes"]) == 1 and res["notes"][0].startswith(note)
    assert err.count(note) == 1  # said once, on stderr


@pytest.mark.parametrize(("value", "topk"), [("topk=5,10", [5, 10]), ("topk=[5, 10]", [5, 10]), ("topk=5", [5])])
def test_set_takes_a_list_as_a_comma_list_or_yaml(tiny, tmp_path, capsys, value, topk):
    code, _, err = run_cli(["train", "--model", "MFBPR", "--data", str(tiny), "--out", str(tmp_path / "r"),
                            "--set", "epochs=1", "--set", value, "--set", "valid_metric=recall@5", "-q"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "results.json").read_text())["config"]["topk"] == topk


def test_results_table_lists_every_metric_by_split(tiny, tmp_path, capsys):
    code, out, _ = run_cli(["train", "--model", "MFBPR", "--data", str(tiny), "--out", str(tmp_path / "r"),
                            "--set", "epochs=2", "--set", "topk=2,5", "--set", "valid_metric=ndcg@5", "-q"], capsys)
    assert code == 0
    header = next(line for line in out.splitlines() if "split" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["split", "K", "recall", "ndcg", "precision",
                                                                  "map", "hit"]
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in out.splitlines() if line.startswith("│")]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [r[:2] for r in rows] == [["valid", "2"], ["valid", "5"], ["test", "2"], ["test", "5"]]
    assert rows[3][3] == f"{res['test']['ndcg@5']:.4f}"


def test_every_run_writes_a_curves_plot(tiny, tmp_path, capsys):
    from PIL import Image

    code, out, _ = run_cli(["train", "--model", "LightGCN", "--data", str(tiny), "--out", str(tmp_path / "r"),
                            "--set", "epochs=4", "-q"], capsys)
    assert code == 0 and f"curves:  {tmp_path / 'r' / 'curves.png'}" in out
    with Image.open(tmp_path / "r" / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1100, 420)
        pixels = np.asarray(im.convert("L"))
    assert (pixels < 100).mean() > 0.01  # axes, text and curves are drawn


# ------------------------------------------------------------------------------------ listing and help
def config_rows(out):
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if line.startswith("│") and cells[0]:
            rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize(("args", "key", "value", "layer", "meaning"), [
    ([], "topk", "[10, 20, 50]", "overall", "cut-offs of every reported metric"),
    ([], "stopping_bpr_below", "0.6", "model", "count patience only once"),
    ([], "knn_k", "10", "model", "neighbours per item in the modality graphs"),
    (["--data", "baby"], "n_mm_layers", "2", "best", "propagation steps on the modality kNN graphs"),
    (["--data", "baby", "--no-best"], "n_mm_layers", "1", "model", "propagation steps"),
    (["--set", "topk=5,10"], "topk", "[5, 10]", "set", "cut-offs"),
    (["--set", "recon=0.5"], "recon", "0.5", "set", "weight of the reconstruction loss"),
])
def test_config_show_lists_keys_with_value_layer_and_meaning(capsys, args, key, value, layer, meaning):
    extra = ["--set", "valid_metric=recall@10"] if "topk=5,10" in args else []
    code, out, err = run_cli(["config", "show", "--model", "DGMRec", *args, *extra], capsys)
    assert code == 0, err
    row = config_rows(out)[key]
    assert row[1:3] == [value, layer] and row[3].startswith(meaning)


def test_config_show_covers_every_key_with_a_meaning(capsys):
    from dgmrec.config import resolve_config

    for model in ("DGMRec", "LightGCN", "BM3"):
        code, out, _ = run_cli(["config", "show", "--model", model], capsys)
        rows = config_rows(out)
        assert code == 0 and set(rows) == set(resolve_config(model, "")[0])
        assert all(r[3] for r in rows.values()), [k for k, r in rows.items() if not r[3]]


def test_config_show_with_a_config_file_and_a_folder(tiny, tmp_path, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("learning_rate: 0.01\n")
    code, out, _ = run_cli(["config", "show", "--model", "LightGCN", "--data", str(tiny), "--config", str(cfg)],
                           capsys)
    assert code == 0
    assert config_rows(out)["learning_rate"][1:3] == ["0.01", "file"]
    assert "note: topk [10, 20, 50] -> [10]" in out  # the folder's 20 items
    bad(capsys, ["config", "show", "--model", "LightGCN", "--data", "nowhere"], "--data: not a dataset folder")


def test_models_lists_a_description_and_needs_per_model(capsys):
    from dgmrec.models import available_models, get_model_class

    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    rows = {r[0]: r for r in config_rows(out).values()}
    assert set(rows) == set(available_models())
    for name in available_models():
        cls = get_model_class(name)
        assert cls.summary and cls.summary.split()[0] in rows[name][4]
    assert rows["LightGCN"][1:4] == ["none", "no", "no"]
    assert rows["DGMRec"][1:4] == ["2+ modalities", "yes", "yes"]


def test_version_matches_the_package_metadata(capsys):
    from pathlib import Path

    import tomllib

    version = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"dgmrec {version}"


@pytest.mark.parametrize("command", [["train"], ["recommend"], ["demo"], ["config", "show"], ["data", "check"],
                                     []])
def test_help_shows_flags_without_a_value(capsys, command):
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0 and "--help" in out
    assert "<bool>" not in out and "BOOLEAN" not in out


@pytest.mark.parametrize(("command", "default"), [(["add-items"], "RUN/added_items"), (["recommend"], "print"),
                                                  (["study", "run"], "the study's")])
def test_help_keeps_the_defaults_written_in_option_texts(capsys, command, default):
    # the help is rendered as rich markup: a "[default: ...]" written in an option's text would vanish
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0 and f"(default: {default})" in " ".join(out.replace("│", " ").split())


def test_make_new_items_counts_only_drawn_items_with_training_rows(tmp_path, capsys):
    import re
    from dataclasses import replace

    from dgmrec.data.masks import draw_new_items
    from dgmrec.data.mmrec import load_mmrec

    ds = make_synthetic(n_users=120, n_items=80, interactions_per_user=10, seed=3, name="gap")
    no_train = np.arange(30)  # items without any training row: a draw may pick them, but they are no new items
    ds = replace(ds, train=ds.train[~np.isin(ds.train[:, 1], no_train)])
    drawn_only, with_file = tmp_path / "a" / "gap", tmp_path / "b" / "gap"
    write_mmrec(ds, drawn_only)
    write_mmrec(ds, with_file)
    code, out, _ = run_cli(["data", "make-new-items", str(with_file), "--out", str(with_file / "gap_new_items.inter")],
                           capsys)
    assert code == 0
    drawn_n, new_n, removed = map(int, re.search(r"(\d+) items drawn, (\d+) of them .* (\d+) training rows removed",
                                                 " ".join(out.split())).groups())
    counts = np.bincount(ds.train[:, 1], minlength=ds.n_items)
    drawn = draw_new_items(counts)  # the command's default seed, the loader's too
    assert drawn_n == drawn.sum() and new_n == np.count_nonzero(drawn & (counts > 0)) < drawn_n
    assert removed == np.isin(ds.train[:, 1], np.flatnonzero(drawn)).sum()
    from_file, drawn_here = (load_mmrec(f, setting="new-items") for f in (with_file, drawn_only))
    assert from_file.new_items.sum() == new_n
    np.testing.assert_array_equal(drawn_here.new_items, from_file.new_items)
    np.testing.assert_array_equal(np.sort(drawn_here.test, axis=0), np.sort(from_file.test, axis=0))
    assert not np.isin(from_file.train[:, 1], np.flatnonzero(from_file.new_items)).any()
