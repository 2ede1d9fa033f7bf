"""Experiments built on trained runs: cross-modal retrieval, the demo."""
