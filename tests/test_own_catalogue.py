"""The walk-through of docs/own-catalogue.md, run as written on the example catalogue (stand-in encoders, a few
epochs), and the rules that make small catalogues train with default settings."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dgmrec.cli import main
from dgmrec.config import fit_cutoffs, resolve_config
from dgmrec.data.example import write_example_catalogue
from dgmrec.data.mmrec import load_mmrec
from dgmrec.data.synthetic import make_synthetic
from test_features import HashTextEncoder, MeanColorImageEncoder  # registers the stand-in encoders

DOC = Path(__file__).parents[1] / "docs" / "own-catalogue.md"
TEST_OPTIONS = {  # what the test adds to the documented commands: stand-in encoders, short training
    "dataset build": ["--text-encoder", HashTextEncoder.name, "--image-encoder", MeanColorImageEncoder.name,
                      "--no-progress"],
    "train": ["--set", "epochs=3", "-q"],
}


def doc_blocks(marker: str, language: str) -> list[str]:
    text = DOC.read_text()
    return re.findall(rf"<!-- {marker} -->\n```{language}\n(.*?)```", text, flags=re.S)


def doc_commands() -> list[str]:
    commands = []
    for block in doc_blocks("own-catalogue", "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("dgmrec "):
                commands.append(" ".join(line.split()))
    return commands


COMMANDS = doc_commands()


def run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """Every documented command, in order, in an empty folder: ``(folder, {command: (code, stdout, stderr)})``."""
    folder = tmp_path_factory.mktemp("walk")
    before = Path.cwd()
    os.chdir(folder)
    try:
        results = {}
        for command in COMMANDS:
            args = shlex.split(command)[1:]
            for prefix, extra in TEST_OPTIONS.items():
                if " ".join(args).startswith(prefix):
                    args += extra
            results[command] = run(args)
    finally:
        os.chdir(before)
    return folder, results


def test_the_walk_through_covers_every_step():
    steps = [" ".join(c.split()[1:3]) for c in COMMANDS]
    for step in ("data example", "dataset build", "data check", "config show", "train --model",
                 "recommend --run", "generate --run"):
        assert any(s.startswith(step) for s in steps), step


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_succeeds(walk, command):
    code, out, err = walk[1][command]
    assert code == 0, f"{command}\n{out}\n{err}"


def test_example_catalogue_has_string_ids_empty_texts_and_missing_images(walk):
    raw = walk[0] / "shop-raw"
    inter = pd.read_csv(raw / "interactions.csv", dtype=str)
    items = pd.read_csv(raw / "items.csv", dtype=str, keep_default_na=False)
    assert inter["user"].str.match(r"user_\d+$").all() and inter["item"].str.match(r"SKU\d{3}$").all()
    assert inter["user"].nunique() == 30 and len(items) == 20 and set(inter["item"]) <= set(items["item_id"])
    assert (items["description"] == "").sum() == 3 and (items["image"] == "").sum() == 5
    assert all((raw / p).is_file() for p in items["image"] if p)


def test_example_catalogue_is_deterministic(tmp_path):
    a = write_example_catalogue(tmp_path / "a", seed=3)
    b = write_example_catalogue(tmp_path / "b", seed=3)
    for name in ("interactions.csv", "items.csv", "images/SKU000.png", "some-users.txt"):
        assert (a.folder / name).read_bytes() == (b.folder / name).read_bytes()
    assert (write_example_catalogue(tmp_path / "c", seed=4).interactions.read_bytes()
            != a.interactions.read_bytes())


def test_built_folder_marks_the_missing_content_by_item(walk):
    raw, data = walk[0] / "shop-raw", walk[0] / "shopdata"
    items = pd.read_csv(raw / "items.csv", dtype=str, keep_default_na=False).set_index("item_id")
    ds = load_mmrec(data)
    for modality, column in (("text", "description"), ("image", "image")):
        missing = set(ds.item_ids[~ds.observed[:, ds.modalities.index(modality)]])
        assert missing == set(items.index[items[column] == ""]), modality
    assert set(ds.user_ids) == set(pd.read_csv(raw / "interactions.csv")["user"])


def test_training_step_notes_the_capped_cutoffs_and_draws_curves(walk):
    command = next(c for c in COMMANDS if c.startswith("dgmrec train --model DGMRec"))
    _, out, err = walk[1][command]
    res = json.loads((walk[0] / "runs" / "shop" / "results.json").read_text())
    assert res["config"]["topk"] == [10] and res["valid_metric"] == "recall@10"
    assert err.count("note: topk [10, 20, 50] -> [10]") == 1
    assert (walk[0] / "runs" / "shop" / "curves.png").stat().st_size > 10_000
    assert "│ test  │ 10 │" in out


def test_recommend_steps_speak_the_catalogue_ids(walk):
    inline = next(c for c in COMMANDS if "--users user_0,user_7" in c)
    recs = pd.read_csv(io.StringIO(walk[1][inline][1]), dtype=str)
    assert list(dict.fromkeys(recs["user"])) == ["user_0", "user_7"] and recs["item"].str.match(r"SKU\d{3}$").all()
    listed = (walk[0] / "shop-raw" / "some-users.txt").read_text().split()[1:]
    written = pd.read_csv(walk[0] / "recs.csv", dtype=str)
    assert list(dict.fromkeys(written["user"])) == listed and len(written) == 5 * len(listed)


def test_python_example_runs(walk):
    (block,) = doc_blocks("own-catalogue-python", "python")
    before = Path.cwd()
    os.chdir(walk[0])
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block, str(DOC), "exec"), {})
    finally:
        os.chdir(before)
    lines = out.getvalue().split("\n")
    assert lines[0].split() == ["user", "rank", "item", "score"]
    assert all(line.split()[0] == "user_0" for line in lines[1:4])


def test_generate_step_writes_a_dataset_with_the_id_maps(walk):
    completed = load_mmrec(walk[0] / "shopdata-completed")
    original = load_mmrec(walk[0] / "shopdata")
    np.testing.assert_array_equal(completed.item_ids, original.item_ids)
    np.testing.assert_array_equal(completed.user_ids, original.user_ids)
    assert all(np.isfinite(completed.features[m]).all() for m in completed.modalities)


# ------------------------------------------------------------------------------------------- small catalogues
@pytest.mark.parametrize(("topk", "valid", "n_items", "expected_topk", "expected_valid"), [
    ([10, 20, 50], "recall@20", 20, [10], "recall@10"),
    ([10, 20, 50], "ndcg@50", 21, [10, 20], "ndcg@20"),
    ([10, 20, 50], "recall@10", 20, [10], "recall@10"),
    ([10, 20, 50], "recall@20", 8, [4], "recall@4"),
    ([10, 20, 50], "hit@20", 1, [1], "hit@1"),
    ([5, 10], "recall@10", 11, [5, 10], "recall@10"),  # nothing to change
])
def test_cutoffs_the_catalogue_cannot_measure_are_dropped(topk, valid, n_items, expected_topk, expected_valid):
    cfg, _ = resolve_config("LightGCN", "")
    fitted, notes = fit_cutoffs({**cfg, "topk": topk, "valid_metric": valid}, n_items)
    assert fitted["topk"] == expected_topk and fitted["valid_metric"] == expected_valid
    assert len(notes) == (expected_topk != topk)


@pytest.mark.parametrize(("min_steps", "batch_size", "first_counting_epoch"), [
    (0, 64, 0),     # patience from the start
    (40, 64, 13),   # 3 batches per epoch: step 40 is reached after epoch 13 (14 epochs, 42 steps)
    (40, 16, 3),    # 10 batches per epoch: after epoch 3
    (41, 16, 4),
])
def test_patience_counts_only_after_the_minimum_number_of_steps(min_steps, batch_size, first_counting_epoch):
    from model_checks import make_trainer

    ds = make_synthetic(n_users=30, n_items=20, interactions_per_user=6, seed=4, name="tiny",
                        modalities=(("image", 8), ("text", 6)))
    assert len(ds.train) == 145  # 3 batches of at most 64, 10 of at most 16
    cfg, _ = resolve_config("MFBPR", "tiny", overrides={"stopping_min_steps": min_steps,
                                                        "train_batch_size": batch_size})
    trainer = make_trainer("MFBPR", ds, cfg, "unused")
    counting = [trainer.patience_counts(epoch) for epoch in range(30)]
    assert counting == [epoch >= first_counting_epoch for epoch in range(30)]


def test_a_one_batch_catalogue_does_not_stop_before_the_minimum_steps(tmp_path):
    ds = make_synthetic(n_users=30, n_items=20, interactions_per_user=6, seed=4, name="tiny",
                        modalities=(("image", 8), ("text", 6)))
    from model_checks import make_trainer

    runs = {}
    for min_steps in (0, 25):
        cfg, _ = resolve_config("MFBPR", "tiny", overrides={"stopping_min_steps": min_steps, "stopping_step": 0,
                                                            "epochs": 40})
        runs[min_steps] = make_trainer("MFBPR", ds, cfg, tmp_path / str(min_steps)).fit().results
    assert runs[0]["early_stopped"] and runs[0]["epochs_run"] < 25  # one step per epoch: patience ran out early
    assert runs[25]["epochs_run"] >= 25
