"""The training stages: train-generator and train-extender fine-tune one role each on the iteration's build-sft
set (the trainer itself is pipeline/training.py). Launch them under torchrun or accelerate to train on several
GPUs: every rank runs the stage, rank 0 alone writes to the store."""

from __future__ import annotations

from ..training import TrainingError, train_role
from . import StageContext, StageError

REQUIRES = ("build-sft",)


def run_role(ctx: StageContext, role: str) -> dict:
    try:
        return train_role(ctx, role)
    except TrainingError as err:
        raise StageError(str(err)) from err
