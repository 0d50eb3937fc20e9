"""Stage train-generator: fine-tune the Generator of this iteration on its build-sft set (the trainer:
pipeline/training.py). Under torchrun or accelerate it trains on several GPUs: every rank runs the stage, rank 0
alone writes to the store."""

from __future__ import annotations

from ..training import train_stage
from . import StageContext

NAME = "train-generator"
REQUIRES = ("build-sft",)


def run(ctx: StageContext) -> dict:
    return train_stage(ctx, "generator")
