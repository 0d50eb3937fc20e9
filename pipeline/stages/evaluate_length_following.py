"""Stage evaluate-length-following: the evaluate stage's benchmarks (LonGen, LongBench-Write, LongWrite-Ruler,
the judge when enabled) asked of the length-following model, which the orchestrator serves under
models.generator. The same items and seeds as every iteration's evaluation, so the report can put the last
iteration's Generator and this model side by side. Outputs under <run>/evaluate-length-following/."""

from __future__ import annotations

import asyncio

from . import StageContext
from .evaluate import evaluate_generator
from .train_length_following import check_last_iteration

NAME = "evaluate-length-following"
REQUIRES = ("train-length-following",)


def run(ctx: StageContext) -> dict:
    if not (ctx.config.evaluate.enabled and ctx.config.length_following.enabled):
        return {"enabled": False, "counts": {"requested": 0, "accepted": 0}}
    check_last_iteration(ctx, NAME)
    return {**asyncio.run(evaluate_generator(ctx, NAME)), "lengthFollowing": True}
