"""Evaluation: metrics and the full-ranking protocol."""

from dgmrec.evaluation.metrics import METRICS, metrics_from_hits, summarize
from dgmrec.evaluation.protocol import Evaluator, SplitTruth, evaluate_ranking, rank_items

__all__ = ["METRICS", "Evaluator", "SplitTruth", "evaluate_ranking", "metrics_from_hits", "rank_items",
           "summarize"]
