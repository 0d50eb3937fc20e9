"""The stages of one macro-iteration. Each module exposes `run(ctx: StageContext) -> dict` (its manifest).

Stages read their inputs from, and write their outputs to, the artifact store only; they never know which
orchestrator (the local runner or a Kubernetes Job started by the operator) runs them.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..artifacts import RunArtifacts, StageArtifacts, artifacts_of
from ..config import RunConfig
from ..metrics import Metrics
from ..metrics import metrics as default_metrics
from ..stage_table import DATA_STAGES, LENGTH_FOLLOWING_STAGES, RUN_STAGES, TABLE, TRAIN_STAGES
from ..store import Store

__all__ = ["DATA_STAGES", "LENGTH_FOLLOWING_STAGES", "RUN_STAGES", "STAGES", "TRAIN_STAGES", "RunArtifacts",
           "StageContext", "StageError", "final_stages", "is_main_process", "iteration_stages", "run_stage",
           "stage_module"]

# Stage name -> module, in the order of a macro-iteration (the table itself: pipeline/stage_table.py).
STAGES: dict[str, str] = {s.name: s.module for s in TABLE}


def final_stages(config: RunConfig) -> tuple[str, ...]:
    """The stages after the last iteration's evaluation: collect, then the length-following training and its
    evaluation (each when enabled; lengthFollowing needs collect)."""
    if not config.collect.enabled:
        return ()
    if not config.length_following.enabled:
        return ("collect",)
    return ("collect", "train-length-following") + (("evaluate-length-following",) if config.evaluate.enabled else ())


def iteration_stages(config: RunConfig, iteration: int) -> tuple[str, ...]:
    """The stages of macro-iteration `iteration`, in order: both orchestrators (the local runner, the operator)
    run exactly these. evaluate when enabled; the final stages (collect, length following) end the last one."""
    last = iteration == config.iterations
    return (DATA_STAGES + TRAIN_STAGES + (("evaluate",) if config.evaluate.enabled else ())
            + (final_stages(config) if last else ()))

log = logging.getLogger("selflengthen.stage")


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a process launched alone."""
    return os.environ.get("RANK", "0") == "0"


class StageError(RuntimeError):
    """A stage cannot run or complete; the message says why. Finished shards stay in the store."""


@dataclass
class StageContext:
    config: RunConfig
    iteration: int
    store: Store
    endpoint: str | None = None  # OpenAI-compatible base URL for stages that generate
    # served name -> base URL, for the models not at `endpoint` (full fine-tuning: a server per role's weights)
    model_endpoints: dict[str, str] = field(default_factory=dict)
    endpoint_gone: Callable[[], str | None] | None = None  # why a server we started has exited (None: running)
    api_key: str | None = field(default=None, repr=False)
    progress: Callable[[str, int, int], None] | None = None  # (stage, done, total)
    metrics: Metrics = field(default_factory=default_metrics, repr=False)

    def artifacts(self, stage: str, iteration: int | None = None) -> StageArtifacts:
        return artifacts_of(self.store, self.config.name, iteration or self.iteration, stage)

    def seed(self, *parts: object) -> int:
        """A stable seed for (run seed, iteration, parts...): reruns draw the same numbers."""
        text = "/".join(str(p) for p in (self.config.seed, self.iteration, *parts))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")

    def tick(self, stage: str, done: int, total: int) -> None:
        labels = {"run": self.config.name, "iteration": str(self.iteration), "stage": stage}
        self.metrics.items_done.labels(**labels).set(done)
        self.metrics.items_planned.labels(**labels).set(total)
        if self.progress:
            self.progress(stage, done, total)


def stage_module(name: str):
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}: one of {', '.join(STAGES)} wanted")
    return importlib.import_module(f"{__name__}.{STAGES[name]}")


def run_stage(name: str, ctx: StageContext) -> dict:
    """Run one stage unless its completion marker exists; returns its manifest."""
    module = stage_module(name)
    artifacts = ctx.artifacts(name)
    if artifacts.done():
        log.info("stage %s of iteration %d already done", name, ctx.iteration)
        return artifacts.manifest()
    for upstream in getattr(module, "REQUIRES", ()):
        if not ctx.artifacts(upstream).done():
            raise StageError(f"stage {name} needs stage {upstream} of iteration {ctx.iteration} to be done first")
    started = time.time()
    log.info("stage %s of iteration %d starting", name, ctx.iteration)
    manifest = {**module.run(ctx), "durationSeconds": round(time.time() - started, 3)}
    # Under torchrun every rank runs the stage; rank 0 alone marks it done (the trainer syncs ranks before).
    manifest = artifacts.finish(manifest) if is_main_process() else manifest
    log.info("stage %s of iteration %d done: %s", name, ctx.iteration, manifest.get("counts"))
    rows = artifacts.read_outputs() if name in ("respond", "extend") else ()
    ctx.metrics.record_stage(ctx.config.name, ctx.iteration, name, manifest, rows)
    return manifest
