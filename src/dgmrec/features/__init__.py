"""From raw item content (texts, image files, ...) to modality feature matrices and MMRec dataset folders.

Every modality goes through one encode path (:func:`encode_modality`) with a source saying what to read per item
(:class:`TextSource`, :class:`ImageSource`, or another :class:`ModalitySource` subclass). Encoders come from the
optional ``features`` extra (``pip install 'dgmrec[features]'``) and are imported only when used; items without
usable content get all-NaN rows, which the data layer reads as missing.
"""

from dgmrec.data.raw import TableFormat, read_table
from dgmrec.features.build import BuildResult, InteractionsSpec, build_dataset, read_interactions
from dgmrec.features.cache import FeatureCache
from dgmrec.features.encoders import (
    DEFAULT_IMAGE_ENCODER,
    DEFAULT_TEXT_ENCODER,
    Encoder,
    ImageEncoder,
    ImagePreprocess,
    TextEncoder,
    TorchImageEncoder,
    load_encoder,
    load_image_encoder,
    load_text_encoder,
    register_encoder,
    register_image_encoder,
    register_text_encoder,
)
from dgmrec.features.given import BuiltModality, built_modalities, encode_given
from dgmrec.features.output import MissingItem, ModalityResult, write_features
from dgmrec.features.pipeline import encode_modality, extract_features
from dgmrec.features.sources import (
    Collected,
    FileSource,
    ImageSource,
    MissingContent,
    ModalitySource,
    TextSource,
)
from dgmrec.features.tables import ItemsTable, read_items

__all__ = [
    "DEFAULT_IMAGE_ENCODER",
    "DEFAULT_TEXT_ENCODER",
    "BuildResult",
    "BuiltModality",
    "Collected",
    "Encoder",
    "FeatureCache",
    "FileSource",
    "ImageEncoder",
    "ImagePreprocess",
    "ImageSource",
    "InteractionsSpec",
    "ItemsTable",
    "MissingContent",
    "MissingItem",
    "ModalityResult",
    "ModalitySource",
    "TableFormat",
    "TextEncoder",
    "TextSource",
    "TorchImageEncoder",
    "build_dataset",
    "built_modalities",
    "encode_given",
    "encode_modality",
    "extract_features",
    "load_encoder",
    "load_image_encoder",
    "load_text_encoder",
    "read_interactions",
    "read_items",
    "read_table",
    "register_encoder",
    "register_image_encoder",
    "register_text_encoder",
    "write_features",
]
