"""Speed-only operations: fused kernels beside their plain autograd references (:mod:`dgmrec.ops.fused`)."""

from dgmrec.ops.fused import (
    TableGradient,
    cosine_nce,
    cosine_nce_reference,
    fused_table_gradients,
    linear_mse,
    linear_mse_reference,
    table_linear,
    table_linear_reference,
    triple_nce,
    triple_nce_reference,
)

__all__ = [
    "TableGradient",
    "cosine_nce",
    "cosine_nce_reference",
    "fused_table_gradients",
    "linear_mse",
    "linear_mse_reference",
    "table_linear",
    "table_linear_reference",
    "triple_nce",
    "triple_nce_reference",
]
