"""A stage's artifacts in the store (where they live: pipeline/layout.py), and the rules that make stages resumable:
work shards written whole, outputs, the manifest, then `_SUCCESS` last.

A stage that finds its _SUCCESS does nothing; one that finds some work shards redoes only the missing ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from .layout import (
    MANIFEST,
    PART,
    SUCCESS,
    WORK,
    check_run_name,
    is_run_stage,
    iteration_prefix,
    iteration_stage_prefix,
    part_name,
    run_stage_prefix,
)
from .store import AlreadyExists, Store, dumps_jsonl, read_json, read_jsonl, write_json

__all__ = ["MANIFEST", "SUCCESS", "RunArtifacts", "StageArtifacts", "artifacts_of", "check_run_name",
           "iteration_prefix", "part_name"]


class StageArtifacts:
    """The artifacts of a stage of iteration `iteration`: <run>/iter-NN/<stage>/..."""

    def __init__(self, store: Store, run: str, iteration: int, stage: str):
        self.store = store
        self.stage = stage
        self.iteration = iteration
        self.prefix = self._prefix(run, iteration, stage)

    @staticmethod
    def _prefix(run: str, iteration: int, stage: str) -> str:
        return iteration_stage_prefix(run, iteration, stage)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    @property
    def uri(self) -> str:
        return f"{self.store.uri}/{self.prefix}"

    # -- completion ---------------------------------------------------------------------------------------------

    def done(self) -> bool:
        return self.store.exists(self.key(SUCCESS))

    def manifest(self) -> dict:
        return read_json(self.store, self.key(MANIFEST))

    def finish(self, manifest: dict) -> dict:
        """Write the manifest, then the completion marker (last, so a reader never sees a half-done stage)."""
        manifest = {"stage": self.stage, "iteration": self.iteration, "finishedAt": time.time(), **manifest}
        write_json(self.store, self.key(MANIFEST), manifest)
        self.store.write(self.key(SUCCESS), b"")
        return manifest

    # -- work shards (the unit of resume) ---------------------------------------------------------------------------

    def work_key(self, index: int) -> str:
        return self.key(f"{WORK}/{part_name(index)}")

    def work_done(self) -> set[int]:
        names = (k.rsplit("/", 1)[-1] for k in self.store.list(self.key(WORK)))
        return {int(m.group(1)) for name in names if (m := PART.fullmatch(name))}

    def write_work(self, index: int, rows: Iterable[dict]) -> bool:
        """Write a finished work shard once; False when another writer finished it first (its copy stands).
        Exactly one of several writers gets True, also when the reply to its write was lost and the write retried
        (see S3Store.write)."""
        try:
            self.store.write(self.work_key(index), dumps_jsonl(rows), if_absent=True)
            return True
        except AlreadyExists:
            return False

    def read_work(self, index: int) -> list[dict]:
        return list(read_jsonl(self.store, self.work_key(index)))

    def iter_work(self) -> Iterator[dict]:
        for index in sorted(self.work_done()):
            yield from read_jsonl(self.store, self.work_key(index))

    # -- outputs -------------------------------------------------------------------------------------------------

    def write_outputs(self, rows: Iterable[dict], shard_size: int) -> int:
        """Write the outputs in shards of shard_size (overwriting a half-finished earlier attempt)."""
        for stale in self.output_keys():
            self.store.delete(stale)
        count, shard, index = 0, [], 0
        for row in rows:
            shard.append(row)
            count += 1
            if len(shard) == shard_size:
                self.store.write(self.key(part_name(index)), dumps_jsonl(shard))
                shard, index = [], index + 1
        if shard:
            self.store.write(self.key(part_name(index)), dumps_jsonl(shard))
        return count

    def output_keys(self) -> list[str]:
        # Direct children only: build-sft/generator's parts are not build-sft's, nor are work shards.
        start = len(self.prefix) + 1
        return [k for k in self.store.list(self.prefix) if PART.fullmatch(k[start:])]

    def read_outputs(self) -> Iterator[dict]:
        for key in self.output_keys():
            yield from read_jsonl(self.store, key)


class RunArtifacts(StageArtifacts):
    """The artifacts of a run-level stage (stage_table.RUN_STAGES): <run>/<stage>/..., the same files and rules as a
    stage of an iteration; `iteration` is the one whose models made them."""

    @staticmethod
    def _prefix(run: str, iteration: int, stage: str) -> str:
        return run_stage_prefix(run, stage)


def artifacts_of(store: Store, run: str, iteration: int, stage: str) -> StageArtifacts:
    """A stage's artifacts, wherever the layout puts them (under its iteration, or under the run)."""
    kind = RunArtifacts if is_run_stage(stage) else StageArtifacts
    return kind(store, run, iteration, stage)
