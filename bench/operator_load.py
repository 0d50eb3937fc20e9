"""Operator benchmark: a hook, pending. A colleague is building the operator and its benchmark.

TODO(operator): replace `run` with the real benchmark (issue 7): 100 SelfLengthenRun objects reconciled at once
against the Kubernetes test API (kopf + kmock), reconcile latency p50/p95 and the operator's memory. Keep the
signature: run(quick: bool) -> list[Row]. (Not named operator.py: with bench/ on sys.path that would shadow the
standard library's operator module.)
"""

from __future__ import annotations

from .common import Row, pending

NOTE = "pending: the operator's load benchmark is being built (bench/operator_load.py is the hook)"


def run(quick: bool = False) -> list[Row]:
    return [
        pending("operator: reconcile latency p50 / p95, 100 runs at once", NOTE),
        pending("operator: peak memory, 100 runs", NOTE),
    ]
