"""Where a stage's artifacts live in the store, and the rules that make stages resumable.

Layout under the store root (file://DIR or s3://BUCKET/PREFIX):

    <run>/iter-01/<stage>/work/part-00000.jsonl   work shards: one per input shard, written whole when done
    <run>/iter-01/<stage>/part-00000.jsonl        outputs, after stage-level filters
    <run>/iter-01/<stage>/manifest.json           counts, rejection reasons, average words, timings
    <run>/iter-01/<stage>/_SUCCESS                written last: the stage is done

A stage that finds its _SUCCESS does nothing; one that finds some work shards redoes only the missing ones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator

from .config import NAME_PATTERN
from .store import AlreadyExists, Store, dumps_jsonl, read_json, read_jsonl, write_json

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
_PART = re.compile(r"part-(\d{5,})\.jsonl")
_ITERATION = re.compile(r"iter-\d+")


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


def part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


class StageArtifacts:
    def __init__(self, store: Store, run: str, iteration: int, stage: str):
        self.store = store
        self.stage = stage
        self.iteration = iteration
        self.prefix = f"{iteration_prefix(run, iteration)}/{stage}"

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
        return self.key(f"work/{part_name(index)}")

    def work_done(self) -> set[int]:
        names = (k.rsplit("/", 1)[-1] for k in self.store.list(self.key("work")))
        return {int(m.group(1)) for name in names if (m := _PART.fullmatch(name))}

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
        return [k for k in self.store.list(self.prefix) if _PART.fullmatch(k[start:])]

    def read_outputs(self) -> Iterator[dict]:
        for key in self.output_keys():
            yield from read_jsonl(self.store, key)
