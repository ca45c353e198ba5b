"""Evaluation: batch prediction to JSONL, the paper's and strict metrics, and the `evaluate` metric module."""
