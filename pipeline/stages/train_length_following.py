"""Stage train-length-following, the method's last step (docs/method.md): after the last iteration,
the final Generator is fine-tuned on collect's (instruction with a true length demand, answer) pairs, mixed with
the last iteration's Generator set so that answers to queries without a demand do not drift (training.py, role
`length-following`). Its model lives under <run>/train-length-following/model; evaluate-length-following scores it.

Run once, with --iteration N (the last): `selflengthen stage train-length-following --iteration N`."""

from __future__ import annotations

from ..training import LENGTH_FOLLOWING, train_stage
from . import StageContext, StageError

NAME = "train-length-following"
REQUIRES = ("collect", "build-sft")


def check_last_iteration(ctx: StageContext, name: str) -> None:
    if ctx.iteration != ctx.config.iterations:
        raise StageError(f"stage {name} runs after the last iteration: --iteration {ctx.config.iterations} wanted, "
                         f"not {ctx.iteration}")


def run(ctx: StageContext) -> dict:
    if not ctx.config.length_following.enabled:
        return {"enabled": False, "counts": {"requested": 0, "accepted": 0}}
    check_last_iteration(ctx, NAME)
    return train_stage(ctx, LENGTH_FOLLOWING)
