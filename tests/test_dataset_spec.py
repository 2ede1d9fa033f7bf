"""DatasetSpec: validation, synthetic parsing, serialisation round trips, loading, and what a run records."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import dgmrec
from dgmrec.data.mmrec import write_mmrec
from dgmrec.data.spec import DatasetSpec
from dgmrec.data.synthetic import make_synthetic
from dgmrec.errors import DataError, InputError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "syn"
    write_mmrec(make_synthetic(n_users=80, n_items=60, interactions_per_user=10, seed=4, name="syn"), path)
    return path


@pytest.mark.parametrize(("data", "seed"), [("synthetic", 0), ("synthetic(seed=7)", 7),
                                            (" synthetic( seed = 12 ) ", 12)])
def test_synthetic_forms(data, seed):
    spec = DatasetSpec(data)
    assert (spec.data, spec.seed, spec.synthetic) == ("synthetic", seed, True)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"data": "synthetic(seed=x)"}, "data: expected synthetic or synthetic(seed=N)"),
    ({"data": "synthetic(seed=-1)"}, "data: expected synthetic or synthetic(seed=N)"),
    ({"data": "synthetic(3)"}, "data: expected synthetic or synthetic(seed=N)"),
    ({"data": "synthetic(seed=3"}, "data: expected synthetic or synthetic(seed=N)"),
    ({"data": ""}, "data: must name a dataset folder"),
    ({"data": 3}, "data: must be a string"),
    ({"data": "synthetic(seed=3)", "seed": 4}, "seed: seed 4 contradicts"),
    ({"data": "synthetic", "seed": -1}, "seed: must be an integer >= 0"),
    ({"data": "synthetic", "seed": "3"}, "seed: must be an integer >= 0"),
    ({"data": "some/folder", "seed": 3}, "seed: only the synthetic dataset takes a seed"),
    ({"data": "synthetic", "mask": "m.npz"}, "mask: the synthetic dataset carries its own mask"),
    ({"data": "some/folder", "setting": "cold"}, "setting: unknown setting 'cold'"),
    ({"data": "some/folder", "modalities": "image,image"}, "modalities: a modality is listed twice"),
    ({"data": "some/folder", "modalities": [1, 2]}, "modalities: must be a list of modality names"),
    ({"data": "some/folder", "mask_letters": "tt=text"}, "mask_letters: expected a single letter"),
    ({"data": "some/folder", "mask": 5}, "mask: must be a string"),
])
def test_bad_fields_are_one_line_errors_naming_the_field(fields, needle):
    with pytest.raises(DataError) as exc:
        DatasetSpec(**fields)
    assert str(exc.value).startswith(needle) and "\n" not in str(exc.value)


@pytest.mark.parametrize(("d", "needle"), [
    ({"data": "synthetic", "modality": ["image"]}, "dataset spec: unknown field 'modality'"),
    ({"seed": 3}, "data: required field missing"),
    (["synthetic"], "dataset spec: a dataset spec must be a mapping"),
])
def test_from_dict_rejects_bad_mappings(d, needle):
    with pytest.raises(DataError, match=f"^{re.escape(needle)}"):
        DatasetSpec.from_dict(d)


@pytest.mark.parametrize("spec", [
    DatasetSpec("synthetic(seed=5)", modalities="image,text", setting="new-items"),
    DatasetSpec("/data/baby", modalities=["text", "image"], mask="/data/baby/m.npy", mask_letters="t=text,v=image"),
    DatasetSpec("relative/folder"),
])
def test_round_trips(spec):
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    assert DatasetSpec.from_json(spec.to_json()) == spec
    assert DatasetSpec.from_yaml(spec.to_yaml()) == spec
    assert json.loads(spec.to_json()) == spec.to_dict()  # plain JSON types only
    assert hash(spec) == hash(DatasetSpec.from_dict(spec.to_dict()))


def test_normalised_forms():
    spec = DatasetSpec("x", modalities=" image , text ", mask_letters={"t": "text", "v": "image"})
    assert spec.modalities == ("image", "text") and spec.mask_letters == "t=text,v=image"
    assert DatasetSpec("x", mask_letters=" t = text ").mask_letters == "t=text"


def test_from_text_reports_bad_json_and_yaml():
    with pytest.raises(DataError, match=r"^dataset spec: not valid JSON"):
        DatasetSpec.from_json("{data: synthetic")
    with pytest.raises(DataError, match=r"^dataset spec: not valid YAML"):
        DatasetSpec.from_yaml("data: [synthetic")


def test_load_synthetic_matches_make_synthetic():
    ds = DatasetSpec("synthetic(seed=3)", modalities=("text", "image")).load()
    ref = make_synthetic(seed=3)
    assert ds.modalities == ["text", "image"]
    np.testing.assert_array_equal(ds.train, ref.train)
    np.testing.assert_array_equal(ds.features["text"], ref.features["text"])
    np.testing.assert_array_equal(ds.observed, ref.observed[:, [1, 0]])
    new = DatasetSpec("synthetic(seed=3)", setting="new-items").load()
    assert new.setting == "new-items" and new.new_items is not None and new.new_items.any()


def test_load_folder_and_the_api_agree(folder):
    spec = DatasetSpec(folder, modalities="image,audio")
    a, b = spec.load(), dgmrec.load_dataset(folder, modalities="image,audio")
    assert a.modalities == b.modalities == ["image", "audio"] and a.name == "syn"
    np.testing.assert_array_equal(a.observed, b.observed)
    np.testing.assert_array_equal(dgmrec.load_dataset(spec).train, a.train)
    with pytest.raises(InputError, match=r"^data: pass the dataset options inside the DatasetSpec"):
        dgmrec.load_dataset(spec, setting="new-items")


def test_resolved_makes_paths_absolute(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    spec = DatasetSpec("syn", mask="syn/observed.npz").resolved()
    assert spec.data == str(folder.resolve()) and spec.mask == str((folder / "observed.npz").resolve())
    assert DatasetSpec("synthetic").resolved() == DatasetSpec("synthetic")


def test_a_run_records_its_spec_and_load_run_rebuilds_from_it(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder.parent)
    spec = DatasetSpec("syn", modalities="image,text")
    results = dgmrec.train("MFBPR", spec, out=tmp_path / "run", overrides={"epochs": 1}, progress=False)
    recorded = DatasetSpec.from_dict(results["run"]["dataset_spec"])
    assert recorded == spec.resolved()
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert DatasetSpec.of_run(best["run"]) == recorded
    monkeypatch.chdir(tmp_path)  # the relative folder no longer resolves: the recorded spec is absolute
    loaded = dgmrec.load_run(tmp_path / "run")
    assert loaded.spec == recorded and loaded.dataset.modalities == ["image", "text"]


def test_load_run_reads_runs_written_before_specs(tmp_path):
    dgmrec.train("MFBPR", "synthetic(seed=2)", modalities="image,text", out=tmp_path / "run",
                 overrides={"epochs": 1}, progress=False)
    path = tmp_path / "run" / "best.pt"
    state = torch.load(path, weights_only=True)
    # the old record: the dataset options one by one
    state["run"] = {"data": "synthetic(seed=2)", "modalities": ["image", "text"], "mask": "", "mask_letters": "",
                    "setting": "missing", "config_layers": [], "model": "MFBPR"}
    torch.save(state, path)
    loaded = dgmrec.load_run(tmp_path / "run")
    assert loaded.spec == DatasetSpec("synthetic", seed=2, modalities=("image", "text"))
    assert len(dgmrec.recommend(loaded, k=3)) == 3 * loaded.dataset.n_users


def test_of_dataset_describes_a_loaded_dataset():
    ds = make_synthetic(seed=6).select_modalities(["audio", "image"])
    assert DatasetSpec.of_dataset(ds) == DatasetSpec("synthetic(seed=6)", modalities=("audio", "image"))
