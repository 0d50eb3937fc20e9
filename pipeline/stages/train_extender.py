"""Stage train-extender: fine-tune the Extender of this iteration (see stages/train.py and training.py)."""

from __future__ import annotations

from . import StageContext
from .train import REQUIRES, run_role

NAME = "train-extender"
__all__ = ["NAME", "REQUIRES", "run"]


def run(ctx: StageContext) -> dict:
    return run_role(ctx, "extender")
