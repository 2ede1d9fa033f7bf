"""Large feature files are memory-mapped, not read, and the dataset built on them is the same."""

from __future__ import annotations

import numpy as np
import pytest

from dgmrec.data import mmrec
from dgmrec.data.mmrec import load_mmrec, write_mmrec
from dgmrec.errors import DataError
from dgmrec.models.base import ModelInput


@pytest.fixture()
def folder(small2, tmp_path):
    feats = {m: x.copy() for m, x in small2.features.items()}
    feats["image"][3] = np.nan  # a whole-NaN row: missing content
    return write_mmrec(small2, tmp_path / "ds", features=feats)


def test_large_files_are_memory_mapped_and_load_the_same_dataset(folder, monkeypatch):
    read = load_mmrec(folder)
    monkeypatch.setattr(mmrec, "MMAP_MIN_BYTES", 1)
    monkeypatch.setattr(mmrec, "_ROW_BLOCK_BYTES", 1000)  # several blocks of rows in the NaN check
    mapped = load_mmrec(folder)
    for m in read.modalities:
        assert isinstance(mapped.features[m], np.memmap) and not mapped.features[m].flags.writeable
        np.testing.assert_array_equal(mapped.features[m], read.features[m])
    assert not mapped.observed[3, 0] and np.array_equal(mapped.observed, read.observed)
    # the model input is the one in-memory copy (imputed), equal to the one built from read features
    a, b = ModelInput.from_dataset(read), ModelInput.from_dataset(mapped)
    for m in read.modalities:
        assert np.array_equal(a.features[m].numpy(), b.features[m].numpy())
        assert b.features[m].numpy().flags.writeable


def test_other_dtypes_are_converted_and_partial_nan_rows_rejected_in_any_block(folder, monkeypatch):
    monkeypatch.setattr(mmrec, "MMAP_MIN_BYTES", 1)
    monkeypatch.setattr(mmrec, "_ROW_BLOCK_BYTES", 1000)
    x = np.load(folder / "text_feat.npy").astype(np.float64)
    np.save(folder / "text_feat.npy", x)
    loaded = mmrec.load_features(folder / "text_feat.npy")
    assert loaded.dtype == np.float32 and not isinstance(loaded, np.memmap)
    x[150, 2] = np.nan  # in a late block of rows
    np.save(folder / "text_feat.npy", x)
    with pytest.raises(DataError, match="row 150 contains NaN"):
        load_mmrec(folder)
