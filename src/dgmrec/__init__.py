"""dgmrec: multimodal recommendation when item modalities are missing."""

__version__ = "0.1.0"
