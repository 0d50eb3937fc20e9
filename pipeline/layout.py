"""The store layout, written once: every key and prefix of a run in the artifact store (docs/architecture.md).

Under the store root (file://DIR or s3://BUCKET/PREFIX), for run <run>:

    <run>/config.yaml                                  the configuration the run's data was made under
    <run>/iter-NN/<stage>/work/part-00000.jsonl        work shards: one per input shard, written whole when done
    <run>/iter-NN/<stage>/part-00000.jsonl             outputs, after stage-level filters
    <run>/iter-NN/<stage>/manifest.json                counts, rejection reasons, average words, timings
    <run>/iter-NN/<stage>/_SUCCESS                     written last: the stage is done
    <run>/iter-NN/build-sft/{generator,extender}/part-*.jsonl         the SFT sets
    <run>/iter-NN/train-R/checkpoints/checkpoint-<step>/... _COMPLETE  training checkpoints of role R
    <run>/iter-NN/train-R/model/... _COMPLETE                          the adapter, or the full model
    <run>/iter-NN/train-R/train-log.jsonl                              one line per logged training step
    <run>/<stage>/...                                  a run-level stage (collect, train-length-following, ...)
    <run>/report/iter-NN.json ...                      the reports

Both orchestrators, the trainer, the reports and the operator's store probe build their keys here; nothing else
spells a path. Pure string functions: no store access.
"""

from __future__ import annotations

import re

from .config import NAME_PATTERN
from .stage_table import RUN_STAGES

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
WORK = "work"
CONFIG = "config.yaml"
TRAIN_LOG = "train-log.jsonl"
MODEL = "model"
CHECKPOINTS = "checkpoints"
REPORT = "report"
PART = re.compile(r"part-(\d{5,})\.jsonl")
CHECKPOINT = re.compile(r"/checkpoints/checkpoint-(\d+)/_COMPLETE$")
_ITERATION = re.compile(r"iter-\d+")

ROLES = ("generator", "extender")
LENGTH_FOLLOWING = "length-following"  # the final Generator, trained to follow length demands: one per run


def check_run_name(run: str) -> str:
    """A run's name is one path segment under the store root (a DNS label, as the configuration wants). Names of
    the form iter-NN are refused: a run of that name in a store nested inside another run's tree (storage.uri
    s3://B/P/other-run) would write into that run's iteration NN."""
    if not isinstance(run, str) or not re.fullmatch(NAME_PATTERN, run) or len(run) > 63:
        raise ValueError(f"run name {run!r}: a DNS label wanted (lowercase letters, digits and '-', at most 63): "
                         f"it is the run's prefix in the store")
    if _ITERATION.fullmatch(run):
        raise ValueError(f"run name {run!r}: names of the form iter-NN are reserved for iteration prefixes")
    return run


def iteration_prefix(run: str, iteration: int) -> str:
    check_run_name(run)
    if iteration < 1:
        raise ValueError(f"iteration {iteration}: 1 or more wanted")
    return f"{run}/iter-{iteration:02d}"


def iteration_stage_prefix(run: str, iteration: int, stage: str) -> str:
    """<run>/iter-NN/<stage> (stage may name a subset, e.g. build-sft/generator)."""
    return f"{iteration_prefix(run, iteration)}/{stage}"


def run_stage_prefix(run: str, stage: str) -> str:
    """<run>/<stage>: a stage of the whole run (stage_table.RUN_STAGES)."""
    return f"{check_run_name(run)}/{stage}"


def is_run_stage(stage: str) -> bool:
    return stage.split("/", 1)[0] in RUN_STAGES


def stage_prefix(run: str, iteration: int, stage: str) -> str:
    """Where a stage's artifacts live: under its iteration, or under the run for the run-level stages (whose
    `iteration` is the one whose models made them)."""
    return run_stage_prefix(run, stage) if is_run_stage(stage) else iteration_stage_prefix(run, iteration, stage)


def part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


def sft_set_prefix(run: str, iteration: int, role: str) -> str:
    """The build-sft set a role trains on: <run>/iter-NN/build-sft/<role>."""
    return iteration_stage_prefix(run, iteration, f"build-sft/{role}")


def collect_prefix(run: str) -> str:
    return run_stage_prefix(run, "collect")


# -- training: role R's stage is train-R ------------------------------------------------------------------------------


def training_stage(role: str) -> str:
    if role not in (*ROLES, LENGTH_FOLLOWING):
        raise ValueError(f"role {role!r}: one of {', '.join((*ROLES, LENGTH_FOLLOWING))} wanted")
    return f"train-{role}"


def training_prefix(run: str, iteration: int, role: str) -> str:
    return stage_prefix(run, iteration, training_stage(role))


def model_prefix(run: str, iteration: int, role: str) -> str:
    """The trained adapter (or full model) of a role in an iteration (the length-following model: the run's)."""
    return f"{training_prefix(run, iteration, role)}/{MODEL}"


def checkpoints_prefix(run: str, iteration: int, role: str) -> str:
    return f"{training_prefix(run, iteration, role)}/{CHECKPOINTS}"


def checkpoint_prefix(run: str, iteration: int, role: str, step: int) -> str:
    return f"{checkpoints_prefix(run, iteration, role)}/checkpoint-{step}"


def train_log_key(run: str, iteration: int, role: str) -> str:
    return f"{training_prefix(run, iteration, role)}/{TRAIN_LOG}"


# -- the run's own files -------------------------------------------------------------------------------------------


def config_key(run: str) -> str:
    return f"{check_run_name(run)}/{CONFIG}"


def report_prefix(run: str) -> str:
    return f"{check_run_name(run)}/{REPORT}"


def report_key(run: str, name: str) -> str:
    return f"{report_prefix(run)}/{name}"


def iteration_report_name(iteration: int, ext: str) -> str:
    return f"iter-{iteration:02d}.{ext}"
