"""The stages, written once: name, module, where their artifacts live, their phase, and what they are served.

Every orchestrator reads this table (the local runner, the operator's state machine and children builders, the
spec checks) and so do the metrics; the stage modules themselves are in pipeline/stages/. It imports nothing of
the package, so that any module (config.py included) may read it. docs/architecture.md explains the phases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Which iteration's models a served stage asks: the previous iteration's (the base model in iteration 1), the
# ones trained in this iteration, or the length-following model (served under the Generator's name).
ServedModels = Literal["previous", "current", "length-following"]


@dataclass(frozen=True)
class Stage:
    name: str  # as on the command line, in the store and in the status
    module: str  # pipeline/stages/<module>.py
    phase: Literal["Generating", "Training", "Evaluating"]
    roles: tuple[str, ...] = ()  # the served models it asks ("base", "generator", "extender"); () needs no server
    models: ServedModels | None = None  # which models are served for it (None: no server)
    scope: Literal["iteration", "run"] = "iteration"  # run: once, after the last iteration, under <run>/<stage>/

    @property
    def served(self) -> bool:
        return bool(self.roles)


# In run order. Self-instruct (and its judge) asks the base model in every iteration; respond and extend the
# previous iteration's models; evaluate and collect the models trained in this iteration.
TABLE: tuple[Stage, ...] = (
    Stage("self-instruct", "self_instruct", "Generating", ("base",), "previous"),
    Stage("respond", "respond", "Generating", ("generator",), "previous"),
    Stage("extend", "extend", "Generating", ("extender",), "previous"),
    Stage("build-sft", "build_sft", "Training"),
    Stage("train-generator", "train_generator", "Training"),
    Stage("train-extender", "train_extender", "Training"),
    Stage("evaluate", "evaluate", "Evaluating", ("generator",), "current"),
    # optional, after the last iteration (collect.enabled, lengthFollowing.enabled): stages of the whole run
    Stage("collect", "collect", "Generating", ("generator", "extender"), "current", "run"),
    Stage("train-length-following", "train_length_following", "Training", scope="run"),
    Stage("evaluate-length-following", "evaluate_length_following", "Evaluating", ("generator",),
          "length-following", "run"),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in TABLE}
NAMES: tuple[str, ...] = tuple(BY_NAME)

DATA_STAGES = ("self-instruct", "respond", "extend")
TRAIN_STAGES = ("build-sft", "train-generator", "train-extender")
EVALUATE_STAGE = "evaluate"
COLLECT_STAGE = "collect"
# The method's last step: the final Generator trained to follow length demands on collect's data, then evaluated.
LENGTH_FOLLOWING_STAGES = ("train-length-following", "evaluate-length-following")
RUN_STAGES = tuple(s.name for s in TABLE if s.scope == "run")
SERVED_STAGES = tuple(s.name for s in TABLE if s.served)
EVALUATE_STAGES = tuple(s.name for s in TABLE if s.phase == "Evaluating")
# The stages that fine-tune a model (one role each), by the role they train.
TRAINED_ROLE = {"train-generator": "generator", "train-extender": "extender",
                "train-length-following": "length-following"}


def stage(name: str) -> Stage:
    """The table's entry of `name`; a KeyError names the known stages."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}: one of {', '.join(NAMES)} wanted") from None
