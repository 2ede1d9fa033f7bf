"""Studies: run keys, resumable runner, report determinism, by-missing-level recall, significance, tuner."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dgmrec import api
from dgmrec.data.mmrec import write_mmrec
from dgmrec.errors import ConfigError
from dgmrec.experiments import analyses as an
from dgmrec.experiments import report as rp
from dgmrec.experiments import study as st


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, small3):
    """The small three-modality synthetic dataset as an MMRec folder (with its mask)."""
    return write_mmrec(small3, tmp_path_factory.mktemp("data") / "small3")


def _study_file(folder: Path, data_dir: Path, **extra) -> Path:
    doc = {
        "name": "t",
        "store": str(folder / "store"),
        "datasets": {"small": {"data": str(data_dir)}},
        "models": ["DGMRec", "LightGCN", "MFBPR"],
        "seeds": [1, 2],
        "overrides": {"epochs": 2, "eval_step": 1},
        "analyses": [
            {"kind": "overall"},
            {"kind": "by_missing_level", "k": [5, 20]},
            {"kind": "retrieval"},
            {"kind": "disentanglement", "items": 40},
            {"kind": "cost"},
            {"kind": "missing_ratio", "dataset": "small", "ratios": [0.0, 0.5], "models": ["LightGCN"]},
            {"kind": "ablation", "variants": ["w/o Alignment"], "seeds": [1]},
        ],
    }
    doc.update(extra)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def done_study(tmp_path_factory, data_dir):
    """A study trained without interruption, and its report."""
    path = _study_file(tmp_path_factory.mktemp("done"), data_dir)
    study = st.load_study(path)
    out = st.run_study(study, progress=False)
    report = rp.build_report(study)
    return study, out, report


def _tables(folder: Path) -> dict[str, bytes]:
    """Every table file of a report except the timings (which differ between two trainings)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix in (".md", ".csv", ".tex") and not p.name.startswith(("cost", "report"))}


# ----------------------------------------------------------------------------------------- spec and keys
def test_run_keys_change_with_a_config_value_and_only_then(tmp_path, data_dir):
    def keys(**extra):
        study = st.load_study(_study_file(tmp_path / str(len(list(tmp_path.iterdir()))), data_dir, **extra))
        return {(c.model, c.seed): c.key for c in st.plan_study(study, write=False).select("main")}

    base = keys()
    # what does not enter a run: the study's name, its analyses, the report folder
    assert keys(name="other", analyses=[], report="elsewhere") == base
    # an override equal to the shipped default resolves to the same configuration
    assert keys(overrides={"epochs": 2, "eval_step": 1, "learning_rate": 0.001}) == base
    changed = keys(overrides={"epochs": 3, "eval_step": 1})
    assert all(changed[k] != base[k] for k in base)
    assert len(set(base.values())) == len(base)  # models x seeds are distinct runs
    dgm_only = keys(variants={"default": {}, "deeper": {"models": ["DGMRec"], "n_mm_layers": 2}})
    assert {k: v for k, v in dgm_only.items() if k in base} == base


def test_synthetic_with_a_seed_is_written_as_on_the_command_line(tmp_path, data_dir):
    def entry(name: str, **spec):
        return st.load_study(_study_file(tmp_path / name, data_dir, datasets={"s": spec}, analyses=[])).datasets["s"]

    written = entry("a", data="synthetic(seed=3)")
    assert (written.data, written.seed) == (entry("b", data="synthetic", seed=3).data, 3)
    with pytest.raises(ConfigError, match="contradicts"):
        entry("c", data="synthetic(seed=3)", seed=4)
    with pytest.raises(ConfigError, match=r"datasets\.s\.data: expected a folder, synthetic or synthetic\(seed=N\)"):
        entry("d", data="synthetic(sed=3)")


def test_run_key_follows_the_dataset_content(tmp_path, data_dir, small3):
    other = write_mmrec(small3.select_modalities(["image", "text"]), tmp_path / "two")
    a = st.load_study(_study_file(tmp_path / "a", data_dir))
    b = st.load_study(_study_file(tmp_path / "b", other))
    ka = {c.key for c in st.plan_study(a, write=False).cells}
    kb = {c.key for c in st.plan_study(b, write=False).cells}
    assert not ka & kb


def test_every_ablation_variant_is_a_valid_dgmrec_configuration(tmp_path, data_dir):
    """All nine variants of Table 4 resolve (an override naming a dropped key fails the plan)."""
    path = _study_file(tmp_path, data_dir, models=[], analyses=[{"kind": "ablation", "seeds": [1]}])
    plan = st.plan_study(st.load_study(path), write=False)
    assert len({c.key for c in plan.cells}) == len(st.ABLATIONS) + 1  # the base and nine distinct variants
    resolved = {k for run in plan.runs.values() for k in run.overrides}
    assert resolved >= {k for v in st.ABLATIONS.values() for k in v}


@pytest.mark.parametrize(("extra", "message"), [
    ({"modelz": ["DGMRec"]}, "unknown key 'modelz'"),
    ({"datasets": {"x": {"data": "synthetic", "mask_leters": "t=text"}}}, "datasets.x: unknown key 'mask_leters'"),
    ({"variants": {"v": {"not_a_key": 1}}}, "unknown configuration key 'not_a_key'"),
    ({"analyses": [{"kind": "overall", "metric": ["recall@20"]}]}, "analyses[0] (overall): unknown key 'metric'"),
    ({"analyses": [{"kind": "ablation", "variants": ["w/o Everything"]}]}, "unknown ablation variant"),
    ({"seeds": ["a"]}, "seeds: must be a non-empty list of integers"),
])
def test_bad_study_files_fail_with_one_line_naming_the_field(tmp_path, data_dir, extra, message):
    path = _study_file(tmp_path, data_dir, **extra)
    with pytest.raises(ConfigError) as exc:
        st.plan_study(st.load_study(path), write=False)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------- runner
def test_a_stored_study_trains_nothing(done_study, monkeypatch):
    study, first, _ = done_study
    assert len(first.trained) == len(st.plan_study(study, write=False).runs)

    def no_training(*args, **kwargs):
        raise AssertionError("trained a stored run")

    monkeypatch.setattr(api, "train", no_training)
    again = st.run_study(study, progress=False)
    assert again.trained == [] and again.analysed == []


def test_a_dry_run_lists_what_is_missing_and_writes_nothing(tmp_path, data_dir, capsys):
    from dgmrec.cli import main

    study_file = _study_file(tmp_path, data_dir)
    study = st.load_study(study_file)
    main(["study", "run", str(study_file), "--dry-run"])
    out = capsys.readouterr().out
    n = len(st.plan_study(study, write=False).runs)
    assert f"{n} runs, {n} to train" in out
    # the plan is not written and nothing is trained (derived inputs, the ratio masks and the materialised
    # synthetic folder, may be: the run keys are computed from them)
    assert not study.plan_path.exists() and not (study.store / "runs").exists()


def test_an_interrupted_study_finishes_with_the_same_tables(tmp_path, data_dir, done_study):
    _, _, report = done_study
    study = st.load_study(_study_file(tmp_path, data_dir))
    assert st.run_study(study, max_runs=2, progress=False).trained  # "killed" after two runs
    plan = st.plan_study(study, write=False)
    left = st.pending_runs(study, plan)
    assert 0 < len(left) < len(plan.runs)
    # a worker on this host died holding a claim: its lock is stale and taken over
    (study.store / "locks").mkdir(exist_ok=True)
    dead = (study.store / "locks" / f"{left[0].key}.lock")
    dead.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "time": 0}))
    # a live claim by another process is respected
    alive = (study.store / "locks" / f"{left[1].key}.lock")
    alive.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "time": 0}))
    second = st.run_study(study, progress=False)
    assert left[0].key in second.trained and second.skipped_locked == [left[1].key]
    alive.unlink()
    st.run_study(study, progress=False)
    assert st.pending_runs(study, plan) == []
    res = rp.build_report(study)
    assert res.missing_runs == []
    assert _tables(study.report) == _tables(report.paths[-1].parent)


def test_report_reads_the_store_alone_and_is_byte_for_byte_repeatable(done_study, tmp_path, data_dir):
    study, _, report = done_study
    first = {p.name: p.read_bytes() for p in report.paths if p.suffix != ".png"}
    # the dataset folder is gone: the report needs only the store
    hidden = tmp_path / "hidden"
    shutil.move(str(data_dir), hidden)
    try:
        again = rp.build_report(study, tmp_path / "again")
    finally:
        shutil.move(str(hidden), data_dir)
    assert {p.name: p.read_bytes() for p in again.paths if p.suffix != ".png"} == first
    names = {p.name for p in report.paths}
    for expected in ("overall_missing.md", "overall_missing.tex", "overall_missing.csv", "cost.md",
                     "by_missing_level_small_missing_at20.png", "retrieval.md", "disentanglement_cosines.png",
                     "disentanglement_cosines_training.png", "missing_ratio_R20_drop.csv", "missing_ratio_R20.png",
                     "ablation.md"):
        assert expected in names
    for p in report.paths:
        if p.suffix == ".md":
            assert "Selection on validation" in p.read_text()
    # the cost table prints epochs as whole numbers (2 per run here) and seconds with three decimals
    cost = next(p for p in report.paths if p.name == "cost.md").read_text().splitlines()
    row = next(line for line in cost if line.startswith("| MFBPR")).strip("|").split("|")
    assert re.fullmatch(r"2( ± 0)?", row[3].strip()) and re.match(r"\d+\.\d{3}( |$)", row[1].strip())


def _paired_test_recall(folder_a: Path, folder_b: Path) -> tuple[np.ndarray, np.ndarray]:
    """The per-user test Recall@20 of two run folders over their common users."""
    a, b = (pd.read_csv(f / "per_user_test.csv").set_index("user")["recall@20"] for f in (folder_a, folder_b))
    users = sorted(set(a.index) & set(b.index))
    return a.loc[users].to_numpy(), b.loc[users].to_numpy()


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_overall_table_holds_seed_means_and_the_improvement(done_study):
    study, _, _ = done_study
    plan = st.plan_study(study, write=False)
    rows = {r["Model"]: r for r in _csv(study.report / "overall_missing.csv")}

    def recall(model):
        return [json.loads((plan.runs[c.key].folder(study.store) / "results.json").read_text())["test"]["recall@20"]
                for c in plan.select("main", model=model)]

    means = {m: float(np.mean(recall(m))) for m in study.models}
    for m in study.models:
        assert float(rows[m]["small R@20"]) == pytest.approx(means[m], abs=1e-6)
        assert float(rows[m]["small R@20 std"]) == pytest.approx(np.std(recall(m), ddof=1), abs=1e-6)
    best, second = sorted(means.values(), reverse=True)[:2]
    assert float(rows["Improv."]["small R@20"]) == pytest.approx((best - second) / second * 100, abs=1e-3)


def test_ablation_rows_hold_the_change_and_the_paired_test_against_the_full_model(done_study):
    from scipy.stats import wilcoxon

    study, _, _ = done_study
    plan = st.plan_study(study, write=False)
    label = next(a.label for a in study.analyses if a.kind == "ablation")
    folders = {c.value: plan.runs[c.key].folder(study.store) for c in plan.cells if c.group == label}
    rows = {r["Variant"]: r for r in _csv(study.report / "ablation.csv")}

    a, b = _paired_test_recall(folders["w/o Alignment"], folders["DGMRec"])
    assert np.any(a != b)
    test = {v: json.loads((f / "results.json").read_text())["test"]["recall@20"] for v, f in folders.items()}
    row = rows["w/o Alignment"]
    assert float(row["small R@20 change"]) == pytest.approx(
        (test["w/o Alignment"] - test["DGMRec"]) / test["DGMRec"] * 100, abs=1e-3)
    assert float(row["small R@20 p (users)"]) == pytest.approx(wilcoxon(a, b).pvalue, rel=1e-4)
    assert rows["DGMRec (full)"]["small R@20 change"] == rows["DGMRec (full)"]["small R@20 p (users)"] == ""


# -------------------------------------------------------------------------------------- by missing level
def test_grouped_recall_by_hand():
    # items 0..5 with groups; user 10 ranks [0, 1, 2], user 11 ranks [3, 4, 5]
    groups = np.array([0, 0, 1, 1, 2, 2])
    top = np.array([[0, 1, 2], [3, 4, 5]])
    users = np.array([10, 11])
    test = np.array([[10, 0], [10, 3], [10, 3], [11, 2], [11, 4], [11, 5], [99, 0]])
    res = an.grouped_recall(top, users, test, groups, ks=[1, 3])
    # group 0: user 10 has {0}, hit at rank 1 -> 1; group 1: user 10 {3} miss, user 11 {2} miss -> 0
    assert res["0"] == {"users": 1, "recall@1": 1.0, "recall@3": 1.0}
    assert res["1"] == {"users": 2, "recall@1": 0.0, "recall@3": 0.0}
    # group 2: user 11 {4, 5}: @1 none (rank 1 is item 3), @3 both
    assert res["2"] == {"users": 1, "recall@1": 0.0, "recall@3": 1.0}
    # all: user 10 {0, 3} -> 1/2 at both K; user 11 {2, 4, 5} -> 0 at 1, 2/3 at 3
    assert res["all"]["recall@1"] == pytest.approx(0.25)
    assert res["all"]["recall@3"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_by_missing_level_agrees_with_the_recommend_command(done_study, capsys):
    from dgmrec.cli import main

    study, _, _ = done_study
    plan = st.plan_study(study, write=False)
    cell = plan.select("main", model="DGMRec", seed=1)[0]
    folder = plan.runs[cell.key].folder(study.store)
    stored = json.loads((folder / an.BY_LEVEL_FILE).read_text())
    capsys.readouterr()
    main(["recommend", "--run", str(folder), "--k", "20", "--exclude", "train"])
    recs = pd.read_csv(io.StringIO(capsys.readouterr().out))
    ds = api.load_run(folder).dataset
    missing = (~ds.observed).sum(axis=1)
    trained = set(ds.train[:, 0].tolist())
    top = {u: set(g["item"]) for u, g in recs.groupby("user")}
    test = pd.DataFrame(ds.test, columns=["user", "item"]).drop_duplicates()
    test = test[test["user"].isin(trained)]
    test["level"] = missing[test["item"].to_numpy()]
    for level, part in test.groupby("level"):
        per_user = [len(top[u] & set(g["item"])) / len(set(g["item"])) for u, g in part.groupby("user")]
        assert stored["groups"][str(level)]["recall@20"] == pytest.approx(np.mean(per_user), abs=1e-12)
        assert stored["groups"][str(level)]["users"] == len(per_user)
    results = json.loads((folder / "results.json").read_text())
    assert stored["groups"]["all"]["recall@20"] == pytest.approx(results["test"]["recall@20"], abs=1e-6)


def test_stored_results_name_the_dataset_relative_to_the_run(done_study, data_dir):
    study, _, _ = done_study
    plan = st.plan_study(study, write=False)
    for key in plan.runs:
        folder = plan.runs[key].folder(study.store)
        spec = json.loads((folder / "results.json").read_text())["run"]["dataset_spec"]
        assert not Path(spec["data"]).is_absolute() and (folder / spec["data"]).resolve() == data_dir.resolve()


def test_by_missing_level_on_a_folder_with_id_maps(tmp_path, small3):
    """Datasets built from raw ids (user_ids.csv / item_ids.csv): the analysis works on internal indices."""
    ds = dataclasses.replace(small3, user_ids=np.array([f"user_{u}" for u in range(small3.n_users)]),
                             item_ids=np.array([f"item_{i}" for i in range(small3.n_items)]))
    folder = write_mmrec(ds, tmp_path / "ids")
    assert (folder / "user_ids.csv").exists()
    res = api.train("LightGCN", folder, out=tmp_path / "run", overrides={"epochs": 1}, progress=False)
    stored = an.by_missing_level(api.load_run(tmp_path / "run"), ks=[20])
    assert stored["groups"]["all"]["recall@20"] == pytest.approx(res["test"]["recall@20"], abs=1e-6)


def test_cold_start_table_holds_each_split_of_the_runs(tmp_path, data_dir):
    path = _study_file(tmp_path, data_dir, models=["LightGCN", "MFBPR"], seeds=[1],
                       datasets={"small": {"data": str(data_dir), "setting": "new-items"}},
                       analyses=[{"kind": "cold_start", "metrics": ["recall@20", "ndcg@20"]}])
    study = st.load_study(path)
    st.run_study(study, progress=False)
    rp.build_report(study)
    rows = list(csv.reader((study.report / "cold_start.csv").read_text().splitlines()))
    means = [j for j, h in enumerate(rows[0]) if j and not h.endswith((" std", " n"))]  # CSV: + std, n columns
    header, body = [rows[0][j] for j in means], {r[0]: [r[j] for j in means] for r in rows[1:]}
    assert header[:5] == [f"small {s} R@20" for s in ("valid", "test", "hybrid", "cold", "warm")]
    plan = st.plan_study(study, write=False)
    for model in ("LightGCN", "MFBPR"):
        cell = plan.select("main", model=model)[0]
        res = json.loads((plan.runs[cell.key].folder(study.store) / "results.json").read_text())
        splits = ("valid", "test", "test_new_items", "test_cold", "test_warm")
        expected = [res[s][m] for m in ("recall@20", "ndcg@20") for s in splits]
        assert [float(v) for v in body[model]] == pytest.approx(expected, abs=5e-5)


def test_missing_ratio_table_compares_the_focus_model_with_the_best_other_at_each_ratio(tmp_path, data_dir):
    from scipy.stats import wilcoxon

    models = ["LightGCN", "MFBPR", "VBPR"]
    path = _study_file(tmp_path, data_dir, models=[], seeds=[1], analyses=[
        {"kind": "missing_ratio", "dataset": "small", "ratios": [0.0, 0.5], "models": models, "focus": "MFBPR"}])
    study = st.load_study(path)
    st.run_study(study, progress=False)
    rp.build_report(study)
    rows = {r[0]: r[1:] for r in csv.reader((study.report / "missing_ratio_R20_absolute.csv").read_text().splitlines())}
    header = rows.pop("Model")
    plan = st.plan_study(study, write=False)
    for ratio in (0.0, 0.5):
        folders = {c.model: plan.runs[c.key].folder(study.store) for c in plan.cells
                   if c.group != "main" and float(c.value) == ratio}
        test = {m: json.loads((f / "results.json").read_text())["test"]["recall@20"] for m, f in folders.items()}
        best = max((m for m in models if m != "MFBPR"), key=test.__getitem__)
        j = header.index(f"{ratio:.0%}")
        assert float(rows["Improv. (MFBPR over the best other)"][j]) == pytest.approx(
            (test["MFBPR"] - test[best]) / test[best] * 100, abs=1e-3)
        mine, other = _paired_test_recall(folders["MFBPR"], folders[best])
        assert float(rows["p (users, Wilcoxon)"][j]) == pytest.approx(wilcoxon(mine, other).pvalue, rel=1e-4)


def test_sensitivity_table_adds_the_base_configuration_when_its_value_is_off_the_grid(tmp_path, data_dir):
    path = _study_file(tmp_path, data_dir, models=[], seeds=[1], analyses=[
        {"kind": "sensitivity", "params": {"lambda1": [0.1], "alpha": [0.8, 0.2]}}])
    study = st.load_study(path)
    out = st.run_study(study, progress=False)
    assert len(out.trained) == 3  # base (lambda1 = 0.01, alpha = 0.8), lambda1 = 0.1, alpha = 0.2
    rp.build_report(study)
    plan = st.plan_study(study, write=False)
    base = next(c for c in plan.cells if c.param == "base")
    assert plan.runs[base.key].config["sampler"] == plan.runs[base.key].config["interModal"] == 0.01
    results = json.loads((plan.runs[base.key].folder(study.store) / "results.json").read_text())
    base_recall = results["test"]["recall@20"]
    lambda1 = {r[0]: r[1] for r in csv.reader((study.report / "sensitivity_lambda1.csv").read_text().splitlines())}
    assert list(lambda1) == ["lambda1", "0.01 (base)", "0.1"]
    assert float(lambda1["0.01 (base)"]) == pytest.approx(base_recall, abs=1e-6)
    # the base value is on the alpha grid: its row is the grid's own, no extra row
    alpha = {r[0]: r for r in csv.reader((study.report / "sensitivity_alpha.csv").read_text().splitlines())}
    assert list(alpha) == ["alpha", "0.2", "0.8"]
    # each row's paired test over users against the base configuration; none for the base itself
    from scipy.stats import wilcoxon

    lambda1_rows = {r[0]: r for r in csv.reader((study.report / "sensitivity_lambda1.csv").read_text().splitlines())}
    p_col = lambda1_rows["lambda1"].index("small R@20 p (users)")
    swept = next(c for c in plan.cells if c.param == "lambda1" and float(c.value) == 0.1)
    a, b = _paired_test_recall(plan.runs[swept.key].folder(study.store), plan.runs[base.key].folder(study.store))
    assert np.any(a != b)
    assert float(lambda1_rows["0.1"][p_col]) == pytest.approx(wilcoxon(a, b).pvalue, rel=1e-4)
    assert lambda1_rows["0.01 (base)"][p_col] == ""
    assert alpha["0.8"][p_col] == ""  # the base configuration's own value on the grid


# ------------------------------------------------------------------------------------------ significance
def test_significance_tests_by_hand():
    # every one of 5 differences positive: exact two-sided Wilcoxon p = 2 / 2^5
    assert an.wilcoxon_users(np.array([2.0, 4, 6, 8, 10]), np.array([1.0, 2, 3, 4, 5])) == pytest.approx(0.0625)
    assert math.isnan(an.wilcoxon_users(np.ones(4), np.ones(4)))
    # differences 1, 2, 3: t = 2 / (1 / sqrt 3); with 2 degrees of freedom p = 1 - t / sqrt(2 + t^2)
    t = 2 * math.sqrt(3)
    assert an.ttest_seeds([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert math.isnan(an.ttest_seeds([1.0], [0.5]))
    assert an.improvement(0.11, 0.10) == pytest.approx(10.0)
    assert an.relative_drop(0.2, 0.15) == pytest.approx(25.0)
    s = an.Stat.of([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)


def test_table_formats():
    t = rp.Table(name="x", title="T", caption="c", header=["Model", "a"],
                 rows=[["A", an.Stat(0.1, 0.01, 2)], ["B", an.Stat(0.2, float("nan"), 1)], ["Improv.",
                                                                                       rp.Percent(12.345)]],
                 bold={(1, 1)})
    assert rp.to_markdown(t).splitlines()[6:] == ["| A | 0.1000 ± 0.0100 |", "| B | **0.2000** |",
                                                  "| Improv. | 12.35% |"]
    assert rp.to_csv(t).splitlines() == ["Model,a,a std,a n", "A,0.100000,0.010000,2", "B,0.200000,,1",
                                         "Improv.,12.345,,"]
    assert "0.1000 $\\pm$ 0.0100 \\\\" in rp.to_latex(t)


# ----------------------------------------------------------------------------------------------- tuning
class _NoTest(dict):
    """A dict that fails the test when a test metric is read from it."""

    def _check(self, key):
        if isinstance(key, str) and key.startswith("test"):
            raise AssertionError(f"the tuner read {key!r}")

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)


def test_tuner_reads_validation_only_and_writes_the_best_configuration(tmp_path, data_dir, monkeypatch):
    pytest.importorskip("optuna")
    from dgmrec.experiments import tuning

    real_train = api.train
    monkeypatch.setattr(api, "train", lambda *a, **k: _NoTest(real_train(*a, **k)))
    real_loads = json.loads

    def guarded_loads(text, **kw):
        hook = kw.pop("object_pairs_hook", None)
        return real_loads(text, object_pairs_hook=lambda pairs: _NoTest(hook(pairs) if hook else pairs), **kw)

    monkeypatch.setattr(tuning.json, "loads", guarded_loads)
    path = _study_file(tmp_path, data_dir, models=["LightGCN"], analyses=[], tuning={
        "model": "LightGCN", "trials": 3, "space": {"learning_rate": {"low": 0.0005, "high": 0.05, "log": True}},
        "pruner": {"startup_trials": 1}})
    res = tuning.tune(st.load_study(path))
    monkeypatch.undo()
    assert res.trials == 3
    chosen = yaml.safe_load(res.output.read_text())
    assert set(chosen) == {"learning_rate"} and "on validation recall@20" in res.output.read_text()
    # the chosen value is the trial with the best validation recall@20 of its log
    study = st.load_study(path)
    best = {}
    for log in (study.store / "runs" / "LightGCN").glob("*/log.jsonl"):
        if not (log.parent / "run.json").is_file():  # a pruned trial
            continue
        cfg = yaml.safe_load((log.parent / "config.yaml").read_text())
        best[cfg["learning_rate"]] = max(json.loads(x)["valid"]["recall@20"] for x in log.read_text().splitlines())
    assert res.value == pytest.approx(max(best.values()))
    assert chosen["learning_rate"] == pytest.approx(max(best, key=best.get))


class _PruneAfter:
    """A stand-in optuna trial that asks to prune once it has seen two evaluations."""

    def __init__(self):
        self.steps = []

    def report(self, value, step):
        self.steps.append((step, value))

    def should_prune(self):
        return len(self.steps) >= 2


def test_a_pruned_trial_stops_its_training_and_keeps_its_checkpoint(tmp_path, data_dir):
    optuna = pytest.importorskip("optuna")
    from dgmrec.experiments import tuning

    study = st.load_study(_study_file(tmp_path, data_dir, models=[], analyses=[]))
    planner = st._Planner(study, st.Fingerprints(study))
    cell = planner.add("tuning", study.datasets["small"], "missing", "LightGCN", "default", 1,
                       {"epochs": 3000, "stopping_step": 3000})
    run = planner.runs[cell.key]
    trial = _PruneAfter()
    with pytest.raises(optuna.TrialPruned):
        tuning._train_trial(study, run, trial, "recall@20")
    folder = run.folder(study.store)
    epochs = len((folder / "log.jsonl").read_text().splitlines())
    assert [s for s, _ in trial.steps[:2]] == [0, 1]
    assert 2 <= epochs < 3000  # interrupted long before its end
    assert (folder / "checkpoint.pt").is_file() and not (folder / "run.json").exists()
    assert not (study.store / "locks" / f"{run.key}.lock").exists()


def test_cost_times_are_medians_of_the_epoch_log(tmp_path):
    """A suspended epoch (here 500 s among sub-second ones) does not move the cost table's times."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"epoch": 0, "train_seconds": 0.2, "eval_seconds": 0.1}, {"epoch": 1, "train_seconds": 500.0},
             {"epoch": 2, "train_seconds": 0.3, "eval_seconds": 0.4}, {"epoch": 3, "train_seconds": 0.25,
                                                                      "eval_seconds": 0.1}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")

    class Ctx:
        def folder(self, key):
            return run if key == "logged" else tmp_path / "absent"

    summary = {"seconds_per_epoch": 125.19, "seconds_per_evaluation": 0.2}
    assert rp._epoch_times(Ctx(), "logged", summary) == pytest.approx((0.275, 0.1))
    # a run without a log falls back to its summary
    assert rp._epoch_times(Ctx(), "other", summary) == (125.19, 0.2)


def test_an_analysis_of_a_stored_run_without_its_checkpoint_trains_it_again(tmp_path, data_dir):
    """A fresh clone holds run records but no checkpoints: a study that adds a post-training analysis rebuilds
    the checkpoint beside the run, leaves the records unchanged and computes the analysis."""
    first = st.load_study(_study_file(tmp_path, data_dir, models=["MFBPR"], seeds=[1], analyses=[{"kind": "overall"}]))
    st.run_study(first, progress=False)
    plan = st.plan_study(first, write=False)
    folder = next(iter(plan.runs.values())).folder(first.store)
    records = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".json", ".jsonl", ".csv")}
    (folder / "best.pt").unlink()
    second = st.load_study(_study_file(tmp_path, data_dir, models=["MFBPR"], seeds=[1],
                                       analyses=[{"kind": "by_missing_level", "k": [20]}]))
    out = st.run_study(second, progress=False)
    assert out.failed == {} and out.trained == [next(iter(plan.runs))]
    record = json.loads((folder / "run.json").read_text())
    assert record["checkpoint_rebuilt"] == {"metrics_equal": True} and "by_missing_level" in record["post"]
    assert (folder / "best.pt").is_file() and (folder / an.BY_LEVEL_FILE).is_file()
    assert not (second.store / st.REBUILD_DIR).exists() or not any((second.store / st.REBUILD_DIR).iterdir())
    for name, content in records.items():
        if name != "run.json":
            assert (folder / name).read_bytes() == content, name
