"""Evaluation: sample from models, score and compare them, and write the report."""

from prefalign.evaluation.evaluate import EvalResult, evaluate
from prefalign.evaluation.report import load_run_curves, write_report
from prefalign.evaluation.summary import METRICS, compute_metrics

__all__ = ["METRICS", "EvalResult", "compute_metrics", "evaluate", "load_run_curves",
           "write_report"]
