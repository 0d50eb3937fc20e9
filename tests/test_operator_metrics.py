"""The operator's Prometheus series (issue 6: runs by phase, current iteration and stage, stage duration, stage
attempts and failures by reason, reconcile errors and latency, children created, and the per-iteration results),
read from a fresh registry after a kmock run with one failed attempt."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from kube_fixtures import Cluster, RealisticKubernetes, Replica, prepare_api, spec
from selflengthen.pipeline.metrics import Metrics

pytestmark = pytest.mark.kmock(cls=RealisticKubernetes)


async def test_operator_metrics_follow_the_run(_paths, kmock):
    await prepare_api(kmock)
    registry = CollectorRegistry()
    m = Metrics(registry)

    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    async def eventually(name, wanted, **labels):
        # the gauges are set right after the status write the test waits for: poll a bounded while
        for _ in range(500):
            if value(name, **labels) == wanted:
                return
            await asyncio.sleep(0.01)
        assert value(name, **labels) == wanted, name

    run = {"run": "demo", "namespace": "ml"}
    async with aiohttp.ClientSession(base_url=str(kmock.url)) as session:
        cluster = Cluster(kmock, session)

        operator = await Replica(cluster, "replica-metrics", metrics=m).start()
        try:
            await cluster.apply("demo", spec(iterations=1, retry={"maxAttempts": 2, "backoffSeconds": 0}))
            await cluster.wait(lambda s: s.get("phase") == "Serving", "Serving")
            await eventually("selflengthen_run_phase", 1, **run, phase="Serving")
            await eventually("selflengthen_run_iterations", 1, **run)
            await cluster.play()
            await cluster.wait(lambda s: s.get("stage") == "self-instruct", "self-instruct")
            await eventually("selflengthen_run_stage", 1, **run, stage="self-instruct")
            await eventually("selflengthen_run_iteration", 1, **run)
            await cluster.fail("demo-i01-self-instruct-a1", "error: boom")
            await cluster.wait(lambda s: s["history"][0]["stages"]["self-instruct"]["attempts"] == 2, "attempt 2")
            while (await cluster.status()).get("phase") != "Succeeded":
                await cluster.play()
        finally:
            await operator.stop()

    assert value("selflengthen_run_phase", **run, phase="Succeeded") == 1
    assert value("selflengthen_run_phase", **run, phase="Serving") == 0
    assert value("selflengthen_stage_attempts_total", **run, stage="self-instruct") == 2
    assert value("selflengthen_stage_attempts_total", **run, stage="train-extender") == 1
    assert value("selflengthen_stage_failures_total", **run, stage="self-instruct", reason="BackoffLimitExceeded") == 1
    assert value("selflengthen_stage_duration_seconds_count", run="demo", stage="extend") == 1
    assert value("selflengthen_operator_children_created_total", namespace="ml", kind="Job") == 7
    assert value("selflengthen_operator_children_created_total", namespace="ml", kind="Deployment") == 1
    assert value("selflengthen_operator_reconcile_duration_seconds_count") > 10
    assert (value("selflengthen_operator_reconcile_errors_total", namespace="ml") or 0) == 0
    it = {**run, "iteration": "1"}
    assert value("selflengthen_iteration_average_words", **it, kind="extended") == 2310.4
    # the extend manifest's averageWordsInitial, as on a laptop (not respond's averageWords)
    assert value("selflengthen_iteration_average_words", **it, kind="initial") == 830
    assert value("selflengthen_iteration_accepted_items", **it, stage="extend") == 5200
    assert value("selflengthen_iteration_training_loss", **it, role="generator") == 1.23


def test_the_phase_gauge_knows_every_phase_the_state_machine_writes():
    from selflengthen.operator.reconcile import ACTIVE_PHASES
    from selflengthen.pipeline.metrics import PHASES

    assert {*ACTIVE_PHASES, "Succeeded", "Failed", "Suspended"} <= set(PHASES)
