"""Per-request balancing over replicas (least outstanding requests): explicit replica URLs, and the endpoint's
host name resolved to all its addresses (client.balancePerRequest: the pods behind a headless Service), against
simulated vLLM replicas (bench/sim_server.py, bench/sim_engine.py) on loopback."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from selflengthen.pipeline.config import Client
from selflengthen.pipeline.inference import InferenceClient

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # last: the repository's operator/ must not shadow the standard library

from bench.sim_engine import SimModel  # noqa: E402
from bench.sim_server import SimServer  # noqa: E402

BODY = {"model": "generator", "messages": [{"role": "user", "content": "Write."}], "max_tokens": 60,
        "ignore_eos": True}


async def send(client: InferenceClient, n: int) -> None:
    answers = await asyncio.gather(*(client.post("/chat/completions", {**BODY, "seed": i}) for i in range(n)))
    assert all(a["usage"]["completion_tokens"] == 60 for a in answers)


async def test_each_request_goes_to_the_replica_with_the_fewest_in_flight():
    """A replica ten times slower holds its requests longer, so it is sent fewer; two alike share evenly."""
    fast, slow = SimModel(time_scale=0.01), SimModel(time_scale=0.1)
    with SimServer(fast) as a, SimServer(slow) as b, SimServer(fast) as c:
        async with InferenceClient(a.endpoint, Client(concurrency=16), replicas=[a.endpoint, b.endpoint]) as client:
            await send(client, 400)
            by_speed = [r.requests for r in client.replicas]
        async with InferenceClient(a.endpoint, Client(concurrency=16), replicas=[a.endpoint, c.endpoint]) as client:
            await send(client, 400)
            alike = [r.requests for r in client.replicas]
        served = [a.stats()["requests"], b.stats()["requests"], c.stats()["requests"]]
    assert sum(by_speed) == sum(alike) == 400
    assert by_speed[0] > 2 * by_speed[1], by_speed
    assert all(160 <= n <= 240 for n in alike), alike
    assert served == [by_speed[0] + alike[0], by_speed[1], alike[1]]  # the servers saw what the client counted
    assert all(r.in_flight == 0 for r in client.replicas)


async def test_the_endpoints_name_is_resolved_to_every_replica(monkeypatch):
    """Two replicas on one port at two loopback addresses, as the pods of a headless Service: requests go to
    both; the name is looked up again after RESOLVE_SECONDS, and a replica gone from the answer gets no more."""
    lookups = []
    answer = ["127.0.0.1", "127.0.0.2"]

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append((host, port))
        return list(answer)

    model = SimModel(time_scale=0.01)
    with SimServer(model) as one, SimServer(model, port=one.port, host="127.0.0.2") as two:
        config = Client(concurrency=8, balance_per_request=True)
        endpoint = f"http://vllm-generator.runs.svc:{one.port}/v1"
        async with InferenceClient(endpoint, config, resolve=resolve) as client:
            await send(client, 100)
            assert lookups == [("vllm-generator.runs.svc", one.port)]  # once within RESOLVE_SECONDS
            first = {r.endpoint: r.requests for r in client.replicas}
            monkeypatch.setattr(InferenceClient, "RESOLVE_SECONDS", 0.0)
            answer.remove("127.0.0.2")
            await send(client, 20)
        counts = one.stats()["requests"], two.stats()["requests"]
    assert first == {f"http://127.0.0.1:{one.port}/v1": counts[0] - 20, f"http://127.0.0.2:{one.port}/v1": counts[1]}
    assert min(first.values()) >= 30, first
    assert len(lookups) > 1 and [r.endpoint for r in client.replicas] == [f"http://127.0.0.1:{one.port}/v1"]


async def test_an_address_or_a_name_without_balancing_is_not_resolved():
    async def resolve(host: str, port: int) -> list[str]:
        raise AssertionError("not to be resolved")

    with SimServer(SimModel(time_scale=0.01)) as sim:
        async with InferenceClient(sim.endpoint, Client(balance_per_request=True), resolve=resolve) as client:
            await send(client, 4)  # 127.0.0.1: an address already
        name = sim.endpoint.replace("127.0.0.1", "localhost")
        async with InferenceClient(name, Client(), resolve=resolve) as client:
            await send(client, 4)  # balancing off: the name goes to aiohttp as it is
            assert [r.requests for r in client.replicas] == [4]


async def test_a_straggler_is_hedged_and_the_same_seed_gives_the_same_answer():
    """client.hedgeAfterSeconds: a request stuck on a slow replica is sent once more, to the other; the first reply
    wins and it is the answer the seed gives anyway (the same text as from the fast replica alone). An unseeded
    request is never hedged."""
    slow, fast = SimModel(time_scale=2.0), SimModel(time_scale=0.01)
    bodies = [{**BODY, "seed": 100 + i} for i in range(8)]
    with SimServer(slow) as s, SimServer(fast) as f:
        async with InferenceClient(f.endpoint, Client(concurrency=8)) as alone:
            wanted = [a["choices"][0]["message"]["content"]
                      for a in await asyncio.gather(*(alone.post("/chat/completions", b) for b in bodies))]
        config = Client(concurrency=8, hedge_after_seconds=0.2)
        async with InferenceClient(s.endpoint, config, replicas=[s.endpoint, f.endpoint]) as client:
            answers = await asyncio.gather(*(client.post("/chat/completions", b) for b in bodies))
            hedged = client.stats.hedges
            unseeded = {k: v for k, v in BODY.items()}
            await client.post("/chat/completions", unseeded)
            assert client.stats.hedges == hedged  # not hedged
            assert all(r.in_flight == 0 for r in client.replicas)  # the losing copies were cancelled
    assert [a["choices"][0]["message"]["content"] for a in answers] == wanted
    assert hedged >= 4  # the four first sent to the slow replica (least outstanding: half each)
