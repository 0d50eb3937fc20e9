"""A run's identity: the configuration stored with its artifacts (<run>/config.yaml) is the contract its data was
made under, so a rerun under the same name never mixes data of two configurations.

A rerun may differ from the stored configuration in result-neutral fields (concurrency, timeouts, ports: see
`affects` in config.py) and in fields whose stages have no data yet. Any other change is refused with the changed
fields and the two ways on: a new name, or `--restart-from STAGE`, which deletes that stage of every iteration and
every stage that read it (later stages of the iteration, and of later iterations through the models) before the
run goes on. The stored configuration is replaced only once nothing in the store disagrees with the new one.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from .config import ConfigError, Model, RunConfig, dump_config, field_affects, read_config
from .layout import CONFIG, SUCCESS, config_key, iteration_report_name, report_key, stage_prefix
from .stages import RUN_STAGES, STAGES
from .store import Store
from .treestore import COMPLETE

log = logging.getLogger("selflengthen.identity")


# What each stage reads: outputs of stages of the same iteration, and of the previous iteration (its trained
# models, and self-instruct's pool of accepted instructions). A stage's results change when any of these do.
READS_SAME_ITERATION: dict[str, tuple[str, ...]] = {
    "self-instruct": (),
    "respond": ("self-instruct",),
    "extend": ("respond",),
    "build-sft": ("extend",),
    "train-generator": ("build-sft",),
    "train-extender": ("build-sft",),
    "evaluate": ("train-generator",),
    "collect": ("self-instruct", "extend", "train-generator", "train-extender"),
    "train-length-following": ("collect", "build-sft", "train-generator"),
    "evaluate-length-following": ("train-length-following",),
}
READS_PREVIOUS_ITERATION: dict[str, tuple[str, ...]] = {
    "self-instruct": ("self-instruct",),  # its pool; the base model writes and judges (not the trained Generator)
    "respond": ("train-generator",),
    "extend": ("train-extender",),
    "train-generator": ("train-generator",),
    "train-extender": ("train-extender",),
}


class ConfigChanged(ConfigError):
    """A rerun whose configuration disagrees with the data already made under the stored one."""


@dataclass(frozen=True)
class Change:
    path: str  # the field's camelCase YAML path
    old: object
    new: object
    stages: tuple[str, ...]  # the stages whose results it changes directly; () = result-neutral

    def describe(self) -> str:
        return f"{self.path}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: object) -> str:
    return "(unset)" if value is None else json.dumps(value, ensure_ascii=False)


def _dump(value: object) -> object:
    return value.model_dump(mode="json", by_alias=True) if isinstance(value, BaseModel) else \
        json.loads(json.dumps(value, default=str))


def diff(old: Model, new: Model, prefix: str = "") -> list[Change]:
    """Every field whose value differs, with the stages it affects (config.field_affects)."""
    changes = []
    for name, info in type(new).model_fields.items():
        a, b = getattr(old, name), getattr(new, name)
        path = f"{prefix}{info.alias or name}"
        if isinstance(a, Model) and type(a) is type(b):
            changes += diff(a, b, f"{path}.")
        elif _dump(a) != _dump(b):
            changes.append(Change(path, _dump(a), _dump(b), field_affects(type(new), name)))
    return changes


# -- stages of the run and what depends on them -------------------------------------------------------------------

Node = tuple[str, int]  # (stage, iteration); a run-level stage (collect, ...) is (stage, the last iteration)


def nodes(iterations: int) -> list[Node]:
    """Every stage of iterations 1..iterations in run order, the run-level stages last (collect, then the
    length-following ones); also the stages switched off now (evaluate, collect, length following): their data,
    if any, must still agree with the stored configuration."""
    found: list[Node] = []
    for k in range(1, iterations + 1):
        found += [(s, k) for s in STAGES if s not in RUN_STAGES]
    return found + [(s, iterations) for s in RUN_STAGES]


def dependents(iterations: int, stages: Iterable[str]) -> list[Node]:
    """The stages named (in every iteration) and every stage that reads, directly or not, what they made."""
    named = set(stages)
    hit: list[Node] = []
    hit_set: set[Node] = set()
    for stage, k in nodes(iterations):  # run order is a topological order
        reads = [(s, k) for s in READS_SAME_ITERATION[stage]]
        reads += [(s, k - 1) for s in READS_PREVIOUS_ITERATION.get(stage, ())] if k > 1 else []
        if stage in named or any(r in hit_set for r in reads):
            hit.append((stage, k))
            hit_set.add((stage, k))
    return hit


def node_prefix(run: str, node: Node) -> str:
    stage, k = node
    return stage_prefix(run, k, stage)


def has_data(store: Store, run: str, node: Node) -> bool:
    """Anything of the stage in the store: finished, or partly done (work shards, checkpoints)."""
    return bool(store.list(node_prefix(run, node)))


def delete_stage(store: Store, run: str, node: Node) -> None:
    """Remove every artifact of a stage: its completion markers first, so that no reader (nor a resume) ever takes
    what is left for a finished stage or tree."""
    keys = store.list(node_prefix(run, node))
    markers = [k for k in keys if k.rsplit("/", 1)[-1] in (SUCCESS, COMPLETE)]
    for key in sorted(markers, key=lambda k: k.rsplit("/", 1)[-1] != SUCCESS) + [k for k in keys if k not in markers]:
        store.delete(key)


def _labels(found: Iterable[Node]) -> str:
    """Stages and their iterations, compactly: 'respond (iterations 1, 2), collect'."""
    by_stage: dict[str, list[int]] = {}
    for stage, k in found:
        by_stage.setdefault(stage, []).append(k)
    return ", ".join(s if s in RUN_STAGES else f"{s} (iteration{'s' if len(ks) > 1 else ''} "
                     f"{', '.join(map(str, sorted(ks)))})"
                     for s, ks in sorted(by_stage.items(), key=lambda item: list(STAGES).index(item[0])))


def _stage_list(stages: Iterable[str]) -> str:
    order = list(STAGES)
    return ", ".join(sorted(set(stages), key=order.index))


# -- the check ----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a rerun does before it starts: the stages it deletes (then redoes), and the changed fields."""

    delete: list[Node]
    changes: list[Change]


def stored_config(store: Store, run: str) -> RunConfig | None:
    key = config_key(run)
    if not store.exists(key):
        return None
    try:
        return read_config(store.read(key), f"{store.uri}/{key}")
    except ConfigError as err:
        raise ConfigError(f"run {run}: the configuration stored with its data ({store.uri}/{key}) is not a valid "
                          f"run configuration of this version ({err}); give this run a new name") from None


def plan_rerun(store: Store, config: RunConfig, restart_from: Iterable[str] = ()) -> Plan:
    """What rerunning `config` may do with the data in the store; raises ConfigChanged when it would mix data of
    two configurations. `restart_from`: stages to delete and redo (with every stage that read them)."""
    restart = list(dict.fromkeys(restart_from))
    for stage in restart:
        if stage not in STAGES:
            raise ConfigError(f"--restart-from {stage}: one of {', '.join(STAGES)} wanted")
    old = stored_config(store, config.name)
    changes = diff(old, config) if old is not None else []
    iterations = max(config.iterations, old.iterations if old else 0)
    run = config.name
    restarted_in_order = dependents(iterations, restart)
    restarted = set(restarted_in_order)
    affected = [c for c in changes if c.stages]
    stale = [n for n in dependents(iterations, (s for c in affected for s in c.stages))
             if n not in restarted and has_data(store, run, n)]
    if stale:
        needed: list[str] = []  # the fewest stages whose restart covers every stale one, earliest first
        for stage in sorted({s for c in affected for s in c.stages}, key=list(STAGES).index):
            left = set(stale) - set(dependents(iterations, needed))
            if left & set(dependents(iterations, [stage])):
                needed.append(stage)
        flag = " ".join(f"--restart-from {s}" for s in dict.fromkeys(restart + needed))
        fields = "\n".join(f"  {c.describe()}   (changes {_stage_list(c.stages)})" for c in affected)
        raise ConfigChanged(
            f"run {run} already has data made with another configuration ({store.uri}/{run}/{CONFIG}); "
            f"these fields differ:\n{fields}\n"
            f"The data of {_labels(stale)} would no longer match the configuration. Either:\n"
            f"  - give the run a new name (name: {run}-2) to start a new run beside this one, or\n"
            f"  - run again with {flag}: it deletes and redoes "
            f"{_stage_list(restart + needed)} in every iteration and what was made from them, and keeps the rest,"
            f"\n  - or undo the change.")
    return Plan(delete=[n for n in restarted_in_order if has_data(store, run, n)], changes=changes)


def claim(store: Store, config: RunConfig, restart_from: Iterable[str] = (), workdir: Path | None = None) -> Plan:
    """Check the rerun (plan_rerun), delete the stages it restarts (and their local model copies), then store the
    configuration: in this order, so a crash in between leaves the old configuration beside data that fits it."""
    plan = plan_rerun(store, config, restart_from)
    run = config.name
    neutral = [c.describe() for c in plan.changes if not c.stages]
    ahead = [c.describe() for c in plan.changes if c.stages]
    if neutral:
        log.info("run %s: result-neutral settings differ from the last run: %s", run, "; ".join(neutral))
    if ahead:
        log.info("run %s: changed settings apply to stages not yet run: %s", run, "; ".join(ahead))
    if plan.delete:
        log.info("run %s: deleting to redo: %s", run, _labels(plan.delete))
    for node in reversed(plan.delete):  # the latest first: an interrupted delete leaves a consistent prefix
        delete_stage(store, run, node)
        stage, k = node
        if workdir is not None and stage.startswith("train-"):  # the runner's copy of a model it will retrain
            shutil.rmtree(workdir / "models" / run / f"iter-{k:02d}" / stage.removeprefix("train-"),
                          ignore_errors=True)
    for k in sorted({k for _, k in plan.delete}):
        for ext in ("json", "md"):
            store.delete(report_key(run, iteration_report_name(k, ext)))
    save_config(store, config)
    return plan


def save_config(store: Store, config: RunConfig) -> None:
    store.write(config_key(config.name), dump_config(config).encode())
