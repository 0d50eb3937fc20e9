"""Operator load: many SelfLengthenRuns reconciled at once against the Kubernetes test API (issue 7).

The API server is kmock made realistic by tests/kube_fixtures.py (RealisticKubernetes, imported unchanged), in this
process, with a clock of its own on every request it receives. The operator is the production kopf registry
(bench/operator_proc.py) in a subprocess, so that its memory is its own RSS, read from /proc/PID/status.

Steps, all against one operator process:
1. warm-up: one run, not counted (first connections, lazy imports, kopf's watch streams);
2. baseline: single runs, one after another, each alone (the next is created once the previous one's reconciles
   went quiet): reconcile latency of 1 run;
3. load: RSS of the idle operator, then N runs created at once (100; `quick`: 10), their latencies, and the
   operator's peak RSS until every run was reconciled and the API went quiet (VmHWM after resetting it through
   /proc/PID/clear_refs, and RSS sampled every 20 ms where that reset is not allowed).

Reconcile latency of a run = from the API server receiving its create to the API server receiving (a) the create of
its first child (a ConfigMap, Service or Deployment labelled with the run) and (b) its first status write. Ratios:
p95 with N runs at once over the single-run p50, goal <= N (see below); memory: peak growth per run, goal < 1 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, Row

HERE = Path(__file__).resolve().parent
NS = "bench"
RUNS = f"/apis/selflengthen.io/v1alpha1/namespaces/{NS}/selflengthenruns"
POLL_SECONDS = 30.0  # the operator's production default: an idle run's daemon sleeps until a child changes
# Goal for the latency: p95 of N runs at once <= N x the single-run p50, i.e. no run waits longer than if the N had
# been reconciled one after another. (A fixed bound such as 10x cannot hold for any operator that does the CPU work of
# its reconciles on one event loop: the last of N simultaneous runs waits for about N reconciles' CPU, and CPU is
# most of a lone run's latency. What the goal catches is worse than linear: lists that grow with the cluster,
# herds of wake-ups, stalls on timers or backoffs.)
MEMORY_GOAL_MIB = 1.0  # peak RSS growth per run
QUIET_SECONDS = 0.5  # the API saw no request (watch streams aside) for this long: the reconciles are over
MiB = 2**20
# kmock matches every request against the requests it keeps (RealisticKubernetes keeps a window of them): with the
# window at its minimum the test API server costs less CPU per request, so that less of the latency is the mock's.
REQUEST_WINDOW = 2


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was measured, no interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0, /proc/PID/clear_refs, same user)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _fixtures():
    """kube_fixtures from tests/, as the operator tests use it (sys.path gains tests/ at its end)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    import kube_fixtures

    return kube_fixtures


def timed_kubernetes_class():
    import attrs
    import kmock

    kf = _fixtures()
    from selflengthen.operator.resources import LABEL_RUN

    @attrs.define(kw_only=True)
    class TimedKubernetes(kf.RealisticKubernetes):
        """RealisticKubernetes plus the arrival time of each run's create, its first child and first status."""

        marks: dict = attrs.field(factory=dict, init=False)
        last_request: float = attrs.field(default=0.0, init=False)

        async def _handle(self, request):
            now = time.perf_counter()
            if request.action != kmock.action.WATCH:
                self.last_request = now
            data = request.data if isinstance(request.data, dict) else {}
            meta = data.get("metadata") or {}
            if request.resource is not None:
                if request.resource.plural == "selflengthenruns":
                    if request.action == kmock.action.CREATE and meta.get("name"):
                        self.marks.setdefault(meta["name"], {})["created"] = now
                    elif request.action == kmock.action.UPDATE and request.subresource == "status":
                        self.marks.setdefault(request.name, {}).setdefault("status", now)
                elif request.action == kmock.action.CREATE and (meta.get("labels") or {}).get(LABEL_RUN):
                    self.marks.setdefault(meta["labels"][LABEL_RUN], {}).setdefault("child", now)
            return await super()._handle(request)

    return TimedKubernetes


class Sampler:
    """The operator's RSS every 20 ms, while the load runs (for when VmHWM cannot be reset)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.task = pid, 0, None

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, proc_status(self.pid)["VmRSS"])
            await asyncio.sleep(0.02)

    def __enter__(self) -> Sampler:
        self.task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def __exit__(self, *exc) -> None:
        self.task.cancel()


async def _measure(n_load: int, n_single: int, log_path: Path) -> dict:
    import aiohttp
    import kmock
    from kmock._internal import parsing

    from selflengthen.operator.crd import crd

    kf = _fixtures()
    original_parse_path = parsing.parse_path
    parsing.parse_path = kf.parse_path  # as the operator tests' _paths fixture does: /api/v1/namespaces itself
    try:
        async with timed_kubernetes_class()(request_window=REQUEST_WINDOW) as k8s, kmock.Server(k8s):
            k8s.resources.load_bundled()
            k8s.register_crd(crd())
            async with aiohttp.ClientSession(base_url=str(k8s.url)) as http:
                async with http.post("/api/v1/namespaces", json={"metadata": {"name": NS}}) as rsp:
                    if rsp.status >= 400:
                        raise RuntimeError(f"cannot create namespace {NS}: {await rsp.text()}")
                return await _against(k8s, http, n_load, n_single, log_path)
    finally:
        parsing.parse_path = original_parse_path


async def _against(k8s, http, n_load: int, n_single: int, log_path: Path) -> dict:
    kf = _fixtures()
    run_spec = kf.spec()

    async def create(name: str) -> None:
        body = {"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun", "metadata": {"name": name},
                "spec": run_spec}
        async with http.post(RUNS, json=body) as rsp:
            if rsp.status >= 400:
                raise RuntimeError(f"create {name}: {rsp.status} {await rsp.text()}")

    async def reconciled(names: list[str], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not all({"created", "child", "status"} <= set(k8s.marks.get(n, {})) for n in names):
            if time.perf_counter() > deadline or proc.returncode is not None:
                missing = [n for n in names if not {"child", "status"} <= set(k8s.marks.get(n, {}))]
                raise RuntimeError(f"{len(missing)} run(s) not reconciled (e.g. {missing[:3]}); operator log: "
                                   f"{log_path.read_text()[-2000:]}")
            await asyncio.sleep(0.01)

    async def quiet(limit: float = 30.0) -> None:
        deadline = time.perf_counter() + limit
        while time.perf_counter() - k8s.last_request < QUIET_SECONDS and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)

    def latencies(names: list[str], key: str) -> list[float]:
        return [k8s.marks[n][key] - k8s.marks[n]["created"] for n in names]

    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "operator_proc.py"), str(k8s.url), NS, str(POLL_SECONDS),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=str(ROOT),
            env={**os.environ, "PYTHONSAFEPATH": "1"})
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if line.strip() != b"ready":
            raise RuntimeError(f"the operator did not start: {log_path.read_text()[-2000:]}")
        rss_start = proc_status(proc.pid)["VmRSS"]

        await create("warmup")
        await reconciled(["warmup"], 60)
        await quiet()
        singles = [f"single-{i:02d}" for i in range(n_single)]
        for name in singles:
            await create(name)
            await reconciled([name], 60)
            await quiet()

        rss_idle = proc_status(proc.pid)["VmRSS"]
        hwm_reset = reset_peak(proc.pid)
        load = [f"load-{i:03d}" for i in range(n_load)]
        with Sampler(proc.pid) as sampler:
            t0, cpu_op0, cpu_api0 = time.perf_counter(), cpu_seconds(proc.pid), time.process_time()
            await asyncio.gather(*(create(name) for name in load))
            await reconciled(load, 300)
            makespan = time.perf_counter() - t0
            cpu = {"operator": cpu_seconds(proc.pid) - cpu_op0, "apiServer": time.process_time() - cpu_api0}
            await quiet()
        mem = proc_status(proc.pid)
        peak = max(sampler.peak, mem["VmHWM"] if hwm_reset else 0, mem["VmRSS"])
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return {
        "single": {key: latencies(singles, key) for key in ("child", "status")},
        "load": {key: latencies(load, key) for key in ("child", "status")},
        "makespanSeconds": makespan,
        "cpuSeconds": cpu,
        "rss": {"start": rss_start, "idle": rss_idle, "peak": peak, "after": mem["VmRSS"]},
        "peakMethod": "VmHWM reset via /proc/PID/clear_refs, and RSS sampled every 20 ms" if hwm_reset
        else "RSS sampled every 20 ms (VmHWM could not be reset)",
        "operatorExit": proc.returncode,
    }


def run(quick: bool = False) -> list[Row]:
    n_load, n_single = (10, 3) if quick else (100, 10)
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        m = asyncio.run(_measure(n_load, n_single, Path(tmp) / "operator.log"))

    rows, cpu = [], m["cpuSeconds"]
    what = {"child": "first child", "status": "first status"}
    for key in ("child", "status"):
        single, load = m["single"][key], m["load"][key]
        p50_1, p50_n, p95_n = statistics.median(single), percentile(load, 50), percentile(load, 95)
        ratio = p95_n / p50_1
        rows.append(Row(
            f"operator: reconcile latency to {what[key]}, p95 of {n_load} runs at once vs p50 of 1 alone",
            round(p95_n * 1000, 1), round(p50_1 * 1000, 1), round(ratio, 3),
            f"<= {n_load}x (as if one after another)", ratio <= n_load, unit="ms",
            note=f"p50 with {n_load} at once {p50_n * 1000:.0f} ms, max {max(load) * 1000:.0f} ms; 1 alone: p50 of "
                 f"{n_single} single runs {p50_1 * 1000:.0f} ms; all {n_load} reconciled in "
                 f"{m['makespanSeconds']:.2f} s = {m['makespanSeconds'] / n_load * 1000:.0f} ms per run; CPU per run "
                 f"meanwhile: operator {cpu['operator'] / n_load * 1000:.1f} ms, test API server (kmock, in the "
                 f"benchmark's process) {cpu['apiServer'] / n_load * 1000:.1f} ms, on {os.cpu_count()} shared cores "
                 f"(load average {os.getloadavg()[0]:.1f})",
            details={"nLoad": n_load, "nSingle": n_single, "singleSeconds": single, "loadSeconds": load,
                     "p50LoadSeconds": p50_n, "p95LoadSeconds": p95_n, "p50SingleSeconds": p50_1,
                     "makespanSeconds": m["makespanSeconds"], "cpuSeconds": cpu}))
    rss = m["rss"]
    growth = max(rss["peak"] - rss["idle"], 0)
    per_run = growth / n_load / MiB
    rows.append(Row(
        f"operator: peak RSS, {n_load} runs at once vs idle (growth per run)",
        round(rss["peak"] / MiB, 1), round(rss["idle"] / MiB, 1), round(rss["peak"] / rss["idle"], 3),
        f"growth < {MEMORY_GOAL_MIB:g} MiB/run", per_run < MEMORY_GOAL_MIB, unit="MiB",
        note=f"operator subprocess RSS: {rss['idle'] / MiB:.1f} MiB idle (after warm-up and {n_single} single runs) "
             f"-> peak {rss['peak'] / MiB:.1f} MiB with {n_load} runs = {per_run * 1024:.0f} KiB per run; "
             f"{rss['after'] / MiB:.1f} MiB once quiet ({m['peakMethod']})",
        details={"rssBytes": rss, "growthPerRunMiB": per_run, "peakMethod": m["peakMethod"],
                 "operatorExit": m["operatorExit"]}))
    return rows
