"""S3 misbehaves: 500/503, SlowDown throttles, dropped connections (before the request reached S3, and after S3
did the work but before the client heard of it), 409 conflicts and cut-off downloads, from a fault-injecting
proxy (s3_proxy.py) in front of the moto server on loopback. The store is the production S3Store, talking to
the proxy as to any S3 endpoint.

Promises proved here:
  * writes and reads retry with backoff and land byte for byte;
  * a data-stage-shaped workflow (work shards, outputs, manifest, _SUCCESS) ends with exactly the objects it
    makes without faults, also after being killed half-way and run again;
  * a reader that goes through done() never sees a stage's outputs before its completion marker;
  * of several writers of one work shard (conditional writes) exactly one is told it won, and the stored shard
    is that writer's, also when the reply to the winning PUT is lost and botocore sends it again (S3 then
    answers 412 to the writer's own object: S3Store tells its own object from another writer's by a token).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import types
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from selflengthen.pipeline import artifacts as artifacts_module
from selflengthen.pipeline.artifacts import SUCCESS, StageArtifacts
from selflengthen.pipeline.store import S3Store, dumps_jsonl

from conftest import BUCKET
from s3_proxy import AFTER, BEFORE, KINDS, Request, S3FaultProxy, seeded_plan

_prefixes = itertools.count()


@pytest.fixture
def proxy(s3_endpoint):
    with S3FaultProxy(s3_endpoint) as running:
        yield running


@pytest.fixture
def prefix() -> str:
    return f"faults-{next(_prefixes)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def moto(s3_endpoint):
    """A client straight to moto: what is really stored, seen without faults."""
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def backoffs(monkeypatch):
    """botocore's retry delays (attempt number, seconds), recorded as computed and slept 20x shorter so the test
    stays fast; S3Store's own retries (409, cut-off bodies) shortened too."""
    from botocore.retries.standard import ExponentialBackoff

    real = ExponentialBackoff.delay_amount
    delays: list[tuple[int, float]] = []

    def recorded(self, context):
        delay = real(self, context)
        delays.append((context.attempt_number, delay))
        return delay / 20

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", recorded)
    monkeypatch.setattr(S3Store, "RETRY_DELAY_SECONDS", 0.005)
    return delays


@pytest.fixture
def fixed_clock(monkeypatch):
    """Manifests carry finishedAt: a fixed clock makes two runs of the same workflow byte-identical."""
    monkeypatch.setattr(artifacts_module, "time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))


def stored(moto, prefix: str) -> dict[str, bytes]:
    keys = [obj["Key"] for page in moto.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
            for obj in page.get("Contents", [])]
    return {key[len(prefix) + 1:]: moto.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


# -- writes and reads ------------------------------------------------------------------------------------------------

PAYLOADS = {
    "empty": b"",
    "small.json": b'{"a": 1}\n',
    "binary.bin": bytes(range(256)) * 4,
    "unicode.jsonl": dumps_jsonl([{"text": "héllo 世界 " * 50, "i": i} for i in range(20)]),
    "big.bin": bytes((i * 7919) % 251 for i in range(2_500_000)),  # > 1 MB: a PUT with Expect: 100-continue
    "deep/a/b/c.txt": b"nested",
}


def test_writes_retry_with_backoff_and_land_byte_identical(proxy, prefix, moto, backoffs):
    """The first two attempts of every request fail, cycling through every kind of write fault; every write
    still succeeds (conditional ones included), and what S3 holds is exactly what was written."""
    kinds = itertools.cycle(["500", "503", "slowdown", "drop", "drop-after", "500-after", "409"])

    def plan(request: Request) -> str | None:
        if request.method != "PUT" or request.attempt > 2:
            return None
        kind = next(kinds)
        return "500" if kind == "409" and not request.conditional else kind  # S3 answers 409 to conditional writes only

    proxy.plan = plan
    store = S3Store(BUCKET, prefix, endpoint_url=proxy.url)
    for i, (key, data) in enumerate(PAYLOADS.items()):
        store.write(key, data, if_absent=i % 2 == 1)  # half of them conditional: none may report a lost race
    store.write("small.json", b'{"a": 2}\n')  # an unconditional rewrite, through faults too

    assert set(proxy.injected) == {"500", "503", "slowdown", "drop", "drop-after", "500-after", "409"}
    assert proxy.faults() >= 2 * (len(PAYLOADS) + 1)
    assert stored(moto, prefix) == {**PAYLOADS, "small.json": b'{"a": 2}\n'}
    # every retry botocore made waited a backoff first, and the windows grow with the attempt
    retried = [r for r, _ in proxy.requests if r.attempt > 1]
    assert len(backoffs) == len(retried) > 0
    assert {attempt for attempt, _ in backoffs} >= {1, 2}
    assert all(0 <= delay <= 2 ** (attempt - 1) for attempt, delay in backoffs)


def test_reads_survive_faults_and_cut_off_bodies(proxy, prefix, moto, backoffs):
    for key, data in PAYLOADS.items():
        moto.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=data)
    kinds = itertools.cycle(["truncate", "500", "drop", "slowdown"])
    proxy.plan = lambda r: next(kinds) if r.attempt == 1 else None
    store = S3Store(BUCKET, prefix, endpoint_url=proxy.url)
    for _ in range(2):  # the cut-off GET is not botocore's to retry (its headers arrived): S3Store reads again
        assert {key: store.read(key) for key in PAYLOADS} == PAYLOADS
    assert store.list("") == sorted(PAYLOADS)
    assert store.exists("big.bin") and not store.exists("missing")
    with pytest.raises(KeyError):
        store.read("missing")
    assert set(proxy.injected) == {"truncate", "500", "drop", "slowdown"}
    assert proxy.faults() >= 2 * len(PAYLOADS)  # the first attempt of every call failed


def test_persistent_errors_fail_clearly_after_the_retry_budget(proxy, prefix, moto, backoffs):
    proxy.plan = lambda r: "503"
    store = S3Store(BUCKET, prefix, endpoint_url=proxy.url)
    with pytest.raises(ClientError) as failure:
        store.write("k", b"v")
    assert "ServiceUnavailable" in str(failure.value) and "max retries" in str(failure.value)
    assert len(proxy.requests) == 11  # the first try and 10 retries, each after a backoff
    assert len(backoffs) == 10
    assert stored(moto, prefix) == {}


# -- a data stage's artifacts ----------------------------------------------------------------------------------------

INPUT_SHARDS = [[{"id": f"i{s}-{k}", "text": " ".join(["word"] * (3 * s + k))} for k in range(3)] for s in range(6)]


def data_stage(store, run: str = "faulty-run", crash_after_outputs: int | None = None) -> StageArtifacts:
    """What a generating stage does to the store (see stages/common.py): a work shard per input shard, written
    once when done, skipped when already there; outputs from the accepted work rows; the manifest; _SUCCESS."""
    store.write(f"{run}/config.yaml", b"name: faulty-run\nseed: 7\n")
    art = StageArtifacts(store, run, 1, "respond")
    done = art.work_done()
    for index, items in enumerate(INPUT_SHARDS):
        if index not in done:
            art.write_work(index, [{**item, "accepted": len(item["text"]) % 3 != 0} for item in items])
    accepted = [row for row in art.iter_work() if row["accepted"]]
    rows = iter(accepted)
    if crash_after_outputs is not None:
        rows = itertools.chain(itertools.islice(rows, crash_after_outputs), _crash())
    art.write_outputs(rows, shard_size=2)
    art.finish({"counts": {"requested": sum(map(len, INPUT_SHARDS)), "accepted": len(accepted)}})
    return art


def _crash():
    raise KeyboardInterrupt("killed")
    yield  # pragma: no cover


@pytest.fixture
def reference(s3_endpoint, moto, fixed_clock) -> dict[str, bytes]:
    """The objects of the workflow run without faults (straight to moto)."""
    prefix = f"reference-{uuid.uuid4().hex[:8]}"
    data_stage(S3Store(BUCKET, prefix, endpoint_url=s3_endpoint))
    objects = stored(moto, prefix)
    accepted = json.loads(objects["faulty-run/iter-01/respond/manifest.json"])["counts"]["accepted"]
    assert 0 < accepted < sum(map(len, INPUT_SHARDS))
    outputs = -(-accepted // 2)
    assert f"faulty-run/iter-01/respond/{SUCCESS}" in objects
    assert len(objects) == 1 + len(INPUT_SHARDS) + outputs + 2  # config, work shards, outputs, manifest, marker
    return objects


@pytest.mark.parametrize("seed", [4, 7])  # seeded: 10+ faults of 6+ kinds, lost replies of conditional PUTs
def test_workflow_under_faults_ends_with_the_objects_it_makes_without(proxy, prefix, moto, backoffs, reference,
                                                                      seed):
    proxy.plan = seeded_plan(seed, rate=0.4)
    data_stage(S3Store(BUCKET, prefix, endpoint_url=proxy.url))
    assert stored(moto, prefix) == reference
    assert proxy.faults() >= 10 and len(proxy.injected) >= 6
    assert set(proxy.injected) & set(BEFORE) and set(proxy.injected) & set(AFTER)
    assert any(kind in ("drop-after", "500-after") and request.conditional for request, kind in proxy.requests)


def test_killed_workflow_rerun_under_faults_ends_with_the_same_objects(proxy, prefix, moto, backoffs, reference):
    """Killed half-way through writing its outputs (after work shards were written), then run again: the kept
    work shards are reused, the stale partial outputs replaced; the result is the fault-free one."""
    proxy.plan = seeded_plan(11, rate=0.25)
    store = S3Store(BUCKET, prefix, endpoint_url=proxy.url)
    with pytest.raises(KeyboardInterrupt):
        data_stage(store, crash_after_outputs=3)
    art = StageArtifacts(store, "faulty-run", 1, "respond")
    assert not art.done() and art.work_done() == set(range(6)) and art.output_keys()  # partial outputs lie there
    work_before = {k: v for k, v in stored(moto, prefix).items() if "/work/" in k}
    data_stage(store)
    after = stored(moto, prefix)
    assert after == reference
    assert {k: v for k, v in after.items() if "/work/" in k} == work_before  # kept, not redone
    assert proxy.faults() >= 5


def test_reader_never_sees_outputs_before_the_completion_marker(proxy, prefix, moto, backoffs, reference):
    """A reader polls the stage while it is written through faults (the reader's requests meet faults too). When
    done() says yes, the outputs and the manifest are complete and agree; before, it reads nothing. The writer is
    held back just before _SUCCESS, so the reader does look while every output shard already exists."""
    faults = seeded_plan(5, rate=0.2)
    held = threading.Event()

    def plan(request: Request) -> str | None:
        if request.method == "PUT" and request.key.endswith(f"/{SUCCESS}") and not held.is_set():
            held.set()
            time.sleep(0.5)  # outputs and manifest written, marker not yet
        return faults(request)

    proxy.plan = plan
    writer_store = S3Store(BUCKET, prefix, endpoint_url=proxy.url)
    reader = StageArtifacts(S3Store(BUCKET, prefix, endpoint_url=proxy.url), "faulty-run", 1, "respond")
    expected = [json.loads(line) for key, data in sorted(reference.items())
                if key.startswith("faulty-run/iter-01/respond/part-") for line in data.splitlines()]
    writer = threading.Thread(target=data_stage, args=(writer_store,))
    writer.start()
    seen_before_done = 0
    try:
        while True:
            if reader.done():
                manifest, outputs = reader.manifest(), list(reader.read_outputs())
                break
            if held.is_set() and reader.output_keys():
                seen_before_done += 1  # outputs exist, unfinished: done() kept the reader off them
            time.sleep(0.02)
    finally:
        writer.join(60)
    assert outputs == expected
    assert manifest["counts"]["accepted"] == len(outputs)
    assert seen_before_done > 0
    assert stored(moto, prefix) == reference


def test_a_crashed_stage_stays_invisible_to_readers(proxy, prefix, moto, backoffs):
    """S3 stops answering in the middle of the outputs: the stage fails with botocore's clear error after its
    retries; the partial outputs stay unread, as done() is false."""
    written: list[str] = []

    def plan(request: Request) -> str | None:
        if request.method == "PUT" and "/respond/part-" in request.path:
            written.append(request.key)
        return "500" if len(set(written)) > 2 else None

    proxy.plan = plan
    store = S3Store(BUCKET, prefix, endpoint_url=proxy.url)
    with pytest.raises(ClientError, match="InternalError"):
        data_stage(store)
    proxy.plan = lambda r: None
    art = StageArtifacts(store, "faulty-run", 1, "respond")
    assert not art.done()
    assert len(art.output_keys()) == 2  # what a reader that skipped done() would have taken for the outputs
    assert "faulty-run/iter-01/respond/manifest.json" not in stored(moto, prefix)


# -- conditional writes: one winner ----------------------------------------------------------------------------------


def rows_of(writer: str) -> list[dict]:
    return [{"id": f"x-{i}", "by": writer} for i in range(3)]


def shard_writes(request: Request, shard: str) -> bool:
    return request.method == "PUT" and request.key.endswith(shard)


def writers_a_and_b(proxy, prefix: str, s3_endpoint: str) -> tuple[StageArtifacts, StageArtifacts]:
    """Two writers of one stage's work shards: A through the faulty proxy, B straight to S3."""
    return (StageArtifacts(S3Store(BUCKET, prefix, endpoint_url=proxy.url), "race", 1, "respond"),
            StageArtifacts(S3Store(BUCKET, prefix, endpoint_url=s3_endpoint), "race", 1, "respond"))


def b_writes_before_a_retries(proxy, b: StageArtifacts, shard: int, first_try: str) -> dict:
    """Plans the proxy: A's first PUT of work shard `shard` meets the fault `first_try`, and B writes that shard
    between it and A's retry. Returns the results, B's under "b"."""
    results = {}

    def plan(request: Request) -> str | None:
        if not shard_writes(request, f"work/part-{shard:05d}.jsonl"):
            return None
        if request.attempt == 1:
            return first_try
        results.setdefault("b", b.write_work(shard, rows_of("b")))
        return None

    proxy.plan = plan
    return results


@pytest.mark.parametrize("lost", ["drop-after", "500-after"])
def test_a_won_write_whose_reply_was_lost_still_reports_the_win(proxy, prefix, moto, backoffs, s3_endpoint, lost):
    """Writer A's PUT creates the shard but its reply is lost; writer B (straight to S3) then loses; botocore
    resends A's PUT, S3 answers 412 to A's own object: A is told it won (True), B lost (False), A's rows stand."""
    a, b = writers_a_and_b(proxy, prefix, s3_endpoint)
    results = b_writes_before_a_retries(proxy, b, 0, lost)
    results["a"] = a.write_work(0, rows_of("a"))
    assert results == {"a": True, "b": False}
    assert a.read_work(0) == rows_of("a")
    statuses = [kind for request, kind in proxy.requests if shard_writes(request, "work/part-00000.jsonl")]
    assert statuses == [lost, None]  # A's retry reached S3 and got 412


def test_a_write_lost_before_it_reached_s3_reports_the_loss(proxy, prefix, moto, backoffs, s3_endpoint):
    """Writer A's PUT is dropped on the way (S3 never saw it); B writes the shard; A's retry gets 412 for B's
    object: A is told it lost (False), B won, B's rows stand."""
    a, b = writers_a_and_b(proxy, prefix, s3_endpoint)
    results = b_writes_before_a_retries(proxy, b, 3, "drop")
    results["a"] = a.write_work(3, rows_of("a"))
    assert results == {"a": False, "b": True}
    assert a.read_work(3) == rows_of("b")


def test_identical_rows_from_two_writers_still_have_one_winner(proxy, prefix, backoffs, s3_endpoint):
    """Reruns write the same rows (seeded requests): the winner is decided by who wrote, not by the bytes."""
    a, b = writers_a_and_b(proxy, prefix, s3_endpoint)
    proxy.plan = lambda r: "drop-after" if r.method == "PUT" and r.attempt == 1 else None
    assert a.write_work(0, rows_of("same")) is True
    assert b.write_work(0, rows_of("same")) is False


def test_a_409_conflict_is_retried_not_taken_for_a_loss(proxy, prefix, moto, backoffs):
    """S3 answers 409 ConditionalRequestConflict while another conditional write of the key is in flight: that
    decided nothing (the other may fail). Taking it for a loss could leave the shard written by no one."""
    proxy.plan = lambda r: "409" if r.n < 3 else None  # the first three tries: each a new call, retried by S3Store
    art = StageArtifacts(S3Store(BUCKET, prefix, endpoint_url=proxy.url), "race", 1, "respond")
    assert art.write_work(0, rows_of("a")) is True
    assert art.read_work(0) == rows_of("a")
    assert proxy.injected["409"] == 3


@pytest.mark.parametrize("seed", [3, 4])
def test_concurrent_writers_under_faults_have_exactly_one_winner(proxy, prefix, moto, backoffs, seed):
    """Six writers (each its own client, as separate pods) race for each of four shards through faults that
    include lost replies of applied writes; for every shard exactly one writer is told it won, and the stored
    shard holds that writer's rows."""
    proxy.plan = seeded_plan(seed, rate=0.35, kinds=("500", "slowdown", "drop", "drop-after", "500-after", "409"))
    writers = [StageArtifacts(S3Store(BUCKET, prefix, endpoint_url=proxy.url), "race", 1, "respond")
               for _ in range(6)]
    results: dict[tuple[int, int], bool] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(writers))

    def write(w: int) -> None:
        try:
            barrier.wait()
            for shard in range(4):
                results[shard, w] = writers[w].write_work(shard, rows_of(f"writer-{w}"))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(len(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    for shard in range(4):
        winners = [w for w in range(len(writers)) if results[shard, w]]
        assert len(winners) == 1, (shard, winners)
        assert writers[0].read_work(shard) == rows_of(f"writer-{winners[0]}")
    assert proxy.injected["drop-after"] + proxy.injected["500-after"] > 0
    assert len(stored(moto, prefix)) == 4


def test_every_fault_kind_is_known():
    assert set(KINDS) == set(BEFORE) | set(AFTER)
    with pytest.raises(ValueError):
        seeded_plan(0, 1.0, kinds=())  # nothing to draw from
