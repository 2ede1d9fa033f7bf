"""Data layer: MMRec folders, raw interactions, masks, imputation, the synthetic dataset and dataset specs."""

from dgmrec.data.dataset import RecDataset
from dgmrec.data.impute import impute_features
from dgmrec.data.masks import (
    generate_missing_mask,
    load_pickled_mask_dict,
    mask_from_key_dict,
    mask_to_key_dict,
    read_mask_file,
    save_plain_mask,
)
from dgmrec.data.mmrec import load_mmrec, make_new_item_split, write_mmrec
from dgmrec.data.raw import read_raw_interactions
from dgmrec.data.spec import DatasetSpec
from dgmrec.data.synthetic import make_synthetic

__all__ = [
    "DatasetSpec",
    "RecDataset",
    "generate_missing_mask",
    "impute_features",
    "load_mmrec",
    "load_pickled_mask_dict",
    "make_new_item_split",
    "make_synthetic",
    "mask_from_key_dict",
    "mask_to_key_dict",
    "read_mask_file",
    "read_raw_interactions",
    "save_plain_mask",
    "write_mmrec",
]
