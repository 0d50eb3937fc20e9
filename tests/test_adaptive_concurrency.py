"""Adaptive concurrency (client.adaptiveConcurrency): the policy, vLLM's gauges, the resizable limit, and the
client following the simulated vLLM (bench/sim_http.py: vLLM's /metrics, a bounded batch and KV cache)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from selflengthen.pipeline.config import Client
from selflengthen.pipeline.inference import KV_HIGH, InferenceClient, Limit, next_concurrency, parse_gauges

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # last: the repository's operator/ must not shadow the standard library

from bench.sim_engine import Engine, SimModel  # noqa: E402
from bench.sim_http import SimHTTP  # noqa: E402
from bench.sim_server import SimServer  # noqa: E402

# What vLLM 0.32's /metrics says (the lines that matter, with their neighbours that must not be mistaken for them).
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="generator"} 12.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="generator"} 3.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="generator",reason="capacity"} 99.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="generator"} 0.4375
vllm:num_requests_running{engine="1",model_name="generator"} 4.0
vllm:kv_cache_usage_perc{engine="1",model_name="generator"} 0.75
vllm:generation_tokens_total{engine="0",model_name="generator"} 4096.0
"""


def test_gauges_are_read_under_vllms_names_summed_over_engines():
    assert parse_gauges(VLLM_METRICS) == {"running": 16.0, "waiting": 3.0, "kv_usage": 0.75}
    assert parse_gauges("vllm:num_requests_running 1.0\n") is None  # not all three: not a vLLM server's metrics
    assert parse_gauges("<html>not found</html>") is None


@pytest.mark.parametrize(("gauges", "full", "threshold", "wanted"), [
    ({"running": 32, "waiting": 0, "kv_usage": 0.1}, True, 1024, (64, 1024)),  # held back by us, room: double
    ({"running": 32, "waiting": 0, "kv_usage": 0.1}, True, 40, (40, 40)),  # ... up to the threshold
    ({"running": 32, "waiting": 0, "kv_usage": 0.1}, True, 32, (34, 32)),  # past it: a sixteenth more
    ({"running": 32, "waiting": 0, "kv_usage": 0.6}, True, 1024, (34, 1024)),  # the cache past half: so too
    ({"running": 32, "waiting": 0, "kv_usage": 0.1}, False, 1024, (32, 1024)),  # the limit not all used: hold
    ({"running": 32, "waiting": 4, "kv_usage": 0.1}, True, 1024, (32, 1024)),  # a short queue fills the batch
    ({"running": 32, "waiting": 9, "kv_usage": 0.1}, True, 1024, (25, 25)),  # a deep queue: shrink, remember
    ({"running": 32, "waiting": 0, "kv_usage": KV_HIGH}, True, 1024, (25, 25)),  # the cache nearly full: so too
])
def test_policy_grows_while_the_server_has_room_and_shrinks_when_it_queues(gauges, full, threshold, wanted):
    assert next_concurrency(32, threshold, full=full, low=1, high=1024, **gauges) == wanted


def test_policy_keeps_within_its_bounds():
    room = {"running": 1, "waiting": 0, "kv_usage": 0.0}
    assert next_concurrency(600, 4096, full=True, low=1, high=1024, **room) == (1024, 4096)
    assert next_concurrency(1, 9, full=True, low=1, high=1024, **{**room, "kv_usage": 1.0}) == (1, 1)
    assert next_concurrency(2, 9, full=True, low=1, high=1024, **{**room, "kv_usage": 1.0}) == (1, 1)


async def test_limit_admits_in_order_and_follows_a_resize():
    limit = Limit(2)
    order: list[int] = []
    release = asyncio.Event()

    async def one(i: int) -> None:
        async with limit:
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(one(i)) for i in range(6)]
    await asyncio.sleep(0.01)
    assert order == [0, 1] and limit.used == 2
    limit.resize(4)
    await asyncio.sleep(0.01)
    assert order == [0, 1, 2, 3] and limit.used == 4
    tasks[5].cancel()  # a waiter that gives up leaves no slot taken
    limit.resize(1)
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 2, 3, 4] and limit.used == 0


async def test_client_grows_to_the_servers_batch_and_backs_off_its_queue(monkeypatch):
    """Against the simulated vLLM (a batch of at most 24): from 2 in flight the client grows while nothing waits,
    then the queue it builds past 24 shrinks it back; never past maxConcurrency. (Where it ends depends on this
    machine's load: a client slow to send keeps the server's queue empty.)"""
    monkeypatch.setattr(InferenceClient, "ADAPT_INTERVAL_SECONDS", 0.05)
    # a request lasts ~0.1 s at a full batch: even a client slowed by a loaded machine sends faster than that
    model = SimModel(peak_tokens_per_s=2000, saturation=16, max_num_seqs=24, time_scale=0.05)
    body = {"model": "generator", "messages": [{"role": "user", "content": "Write."}], "max_tokens": 200,
            "ignore_eos": True}
    config = Client(concurrency=2, adaptive_concurrency=True, max_concurrency=64, request_timeout_seconds=60)
    with SimServer(model) as sim:
        async with InferenceClient(sim.endpoint, config) as client:
            peak = 0

            async def one(i: int) -> None:
                nonlocal peak
                peak = max(peak, client.stats.in_flight)
                await client.post("/chat/completions", {**body, "seed": i})
                peak = max(peak, client.stats.in_flight)

            await asyncio.gather(*(one(i) for i in range(600)))
            limits = list(client.stats.limits)
        stats = sim.stats()
    assert limits and limits[0] > 2, limits  # it grew
    top = max(limits)
    assert top > 24 and limits.index(top) < len(limits) - 1 and min(limits[limits.index(top):]) < top, limits
    assert peak <= 64 and max(limits) <= 64
    assert stats["meanAdmitted"] > 6  # the server was kept far busier than the 2 in flight it started with


async def test_a_server_without_vllm_metrics_keeps_the_configured_concurrency(monkeypatch, caplog):
    from chat_server import ChatServer

    monkeypatch.setattr(InferenceClient, "ADAPT_INTERVAL_SECONDS", 0.02)
    caplog.set_level(logging.INFO, logger="selflengthen.pipeline.inference")
    config = Client(concurrency=3, adaptive_concurrency=True, request_timeout_seconds=10)
    with ChatServer(lambda body: "An answer.") as server:
        async with InferenceClient(server.endpoint, config) as client:
            assert await client.server_gauges() is None
            messages = [{"role": "user", "content": "Hi."}]
            for _ in range(5):
                await asyncio.gather(*(client.post("/chat/completions", {"model": "generator", "messages": messages,
                                                                         "max_tokens": 8}) for _ in range(6)))
                await asyncio.sleep(0.03)
            assert client.stats.limits == [] and client._limit.limit == 3
    assert sum("no vLLM gauges" in r.getMessage() for r in caplog.records) == 1  # said once, not every look


async def test_the_simulator_admits_within_its_kv_cache_and_reports_vllms_gauges():
    m = SimModel(kv_cache_tokens=10_000, max_num_seqs=256, time_scale=0.05)
    http = SimHTTP(m)
    http.engine = Engine(m)
    futures = [http.engine.submit(1000, 2000, "fixed") for _ in range(10)]
    # three fit (9,000 of 10,000 reserved), the fourth waits and so does everything behind it
    assert parse_gauges(http.metrics()) == {"running": 3.0, "waiting": 7.0, "kv_usage": pytest.approx(0.3)}
    await asyncio.sleep(0.3)  # part of their decoding
    gauges = parse_gauges(http.metrics())
    assert gauges["running"] == 3 and 0.3 < gauges["kv_usage"] <= 0.9
    await asyncio.gather(*futures)
    assert parse_gauges(http.metrics()) == {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0}
