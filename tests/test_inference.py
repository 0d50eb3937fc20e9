"""InferenceClient against a real local HTTP server that fails on cue: retries, backoff, deadline, concurrency."""

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from selflengthen.pipeline.config import Client, Sampling
from selflengthen.pipeline.inference import (
    InferenceClient,
    InferenceError,
    ModelNotFound,
    RequestRejected,
    ServerUnavailable,
)

MESSAGES = [{"role": "user", "content": "Write a long story."}]


def fast(**overrides) -> Client:
    """Client settings scaled down so a test takes well under a second."""
    settings = dict(
        concurrency=4,
        request_timeout_seconds=2,
        max_attempts=8,
        backoff_seconds=0.01,
        max_backoff_seconds=0.05,
        deadline_seconds=5,
    )
    settings.update(overrides)
    return Client(**settings)


class FakeServer:
    """An OpenAI-compatible server on loopback. Each hit takes the next scripted action; an empty script answers
    200 with a chat completion. Actions: an HTTP status, ("slow", seconds) to answer 200 only after that long,
    or ("raw", status, body bytes)."""

    def __init__(self):
        self.script: list = []
        self.delay = 0.0  # handling time of every request
        self.hits: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # set at teardown: ends slow handlers at once
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out separately: no 40 ms delayed-ACK stalls

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle(self, None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                fake.handle(self, json.loads(self.rfile.read(length)))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def handle(self, request: BaseHTTPRequestHandler, body):
        with self.lock:
            n = len(self.hits)
            self.hits.append(
                {
                    "at": time.monotonic(),
                    "method": request.command,
                    "path": request.path,
                    "headers": dict(request.headers),
                    "body": body,
                }
            )
            action = self.script.pop(0) if self.script else 200
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.delay:
            self.release.wait(self.delay)
        if isinstance(action, tuple) and action[0] == "slow":
            self.release.wait(action[1])
            action = 200
        if isinstance(action, tuple) and action[0] == "raw":
            status, payload = action[1], action[2]
        elif action == 200:
            status, payload = 200, json.dumps(self.ok_body(request.path, n)).encode()
        else:
            status, payload = action, json.dumps({"error": {"message": f"scripted {action}"}}).encode()
        with self.lock:  # done before the reply leaves, so the client never sees a finished request counted
            self.in_flight -= 1
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this one (timeout)

    @staticmethod
    def ok_body(path: str, n: int) -> dict:
        if path.endswith("/models"):
            return {"object": "list", "data": [{"id": "generator"}, {"id": "extender"}]}
        return {
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": f"answer {n}"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        }

    def arrivals(self) -> list[float]:
        return [h["at"] for h in self.hits]


@pytest.fixture
def server():
    fake = FakeServer()
    fake.thread.start()
    yield fake
    fake.release.set()
    fake.httpd.shutdown()
    fake.httpd.server_close()


@pytest.fixture
def dead_endpoint():
    """A port that is bound but not listening: connections are refused at once (and no one else can take it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()


# -- requests --------------------------------------------------------------------------------------------------------


async def test_chat_returns_the_generation(server):
    async with InferenceClient(server.endpoint, fast()) as client:
        gen = await client.chat("generator", MESSAGES, Sampling())
    assert gen.text == "answer 0"
    assert gen.finish_reason == "stop"
    assert gen.completion_tokens == 5
    assert client.stats.completion_tokens == 5
    assert client.stats.requests == 1 and client.stats.retries == 0
    assert [(h["method"], h["path"]) for h in server.hits] == [("POST", "/v1/chat/completions")]


async def test_request_body_carries_the_sampling_params(server):
    sampling = Sampling(temperature=0.3, top_p=0.9, top_k=7, repetition_penalty=1.05, max_tokens=500, stop=["END"])
    messages = MESSAGES + [{"role": "assistant", "content": "Once upon a time"}]
    async with InferenceClient(server.endpoint, fast()) as client:
        await client.chat("extender", messages, sampling, max_tokens=33, continue_final=True, seed=7)
        await client.chat("generator", MESSAGES, Sampling())
    first, second = (h["body"] for h in server.hits)
    assert first == {
        "model": "extender",
        "messages": messages,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 7,
        "repetition_penalty": 1.05,
        "max_tokens": 33,
        "stop": ["END"],
        "seed": 7,
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    # reference defaults; no stop strings, no seed and no prefix continuation unless asked
    assert second == {
        "model": "generator",
        "messages": MESSAGES,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.1,
        "max_tokens": 16384,
    }


async def test_api_key_is_sent_as_a_bearer_token(server):
    async with InferenceClient(server.endpoint, fast(), api_key="s3cret") as client:
        await client.chat("generator", MESSAGES, Sampling())
    async with InferenceClient(server.endpoint, fast()) as client:
        await client.chat("generator", MESSAGES, Sampling())
    assert server.hits[0]["headers"].get("Authorization") == "Bearer s3cret"
    assert "Authorization" not in server.hits[1]["headers"]


async def test_models_lists_the_served_names(server):
    async with InferenceClient(server.endpoint + "/", fast()) as client:
        assert await client.models() == ["generator", "extender"]
    assert [(h["method"], h["path"]) for h in server.hits] == [("GET", "/v1/models")]


# -- retries ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
async def test_429_is_retried_until_success(server, n):
    server.script = [429] * n
    async with InferenceClient(server.endpoint, fast()) as client:
        gen = await client.chat("generator", MESSAGES, Sampling())
    assert len(server.hits) == n + 1
    assert gen.text == f"answer {n}"
    assert (client.stats.requests, client.stats.retries, client.stats.errors) == (n + 1, n, n)
    assert len(client.stats.backoffs) == n
    assert all(h["body"] == server.hits[0]["body"] for h in server.hits)  # the same request each time


@pytest.mark.parametrize("script", [[500], [502], [503], [504], [500, 502, 503]])
async def test_server_errors_are_retried_until_success(server, script):
    server.script = list(script)
    async with InferenceClient(server.endpoint, fast()) as client:
        gen = await client.chat("generator", MESSAGES, Sampling())
    assert len(server.hits) == len(script) + 1
    assert gen.text == f"answer {len(script)}"
    assert client.stats.retries == len(script)


async def test_slow_response_times_out_and_is_retried(server):
    server.script = [("slow", 3.0)]
    start = time.monotonic()
    async with InferenceClient(server.endpoint, fast(request_timeout_seconds=0.2)) as client:
        gen = await client.chat("generator", MESSAGES, Sampling())
    elapsed = time.monotonic() - start
    assert gen.text == "answer 1"
    assert len(server.hits) == 2
    assert client.stats.retries == 1
    assert 0.2 <= elapsed < 1.5  # gave up on the slow one after the per-request timeout


@pytest.mark.parametrize("status", [400, 401, 413, 422])
async def test_client_errors_are_not_retried(server, status):
    server.script = [status]
    async with InferenceClient(server.endpoint, fast()) as client:
        with pytest.raises(RequestRejected) as info:
            await client.chat("generator", MESSAGES, Sampling())
    assert not isinstance(info.value, ModelNotFound)
    assert info.value.status == status
    assert len(server.hits) == 1
    assert client.stats.retries == 0
    message = str(info.value)
    assert server.endpoint in message and f"HTTP {status}" in message and f"scripted {status}" in message


async def test_unknown_model_is_not_retried(server):
    server.script = [404]
    async with InferenceClient(server.endpoint, fast()) as client:
        with pytest.raises(ModelNotFound) as info:
            await client.chat("no-such-model", MESSAGES, Sampling())
    assert info.value.status == 404
    assert isinstance(info.value, RequestRejected)
    assert len(server.hits) == 1


@pytest.mark.parametrize(
    "action, wanted",
    [
        (("raw", 200, b"<html>not json</html>"), "invalid JSON"),
        (("raw", 200, b'{"choices": []}'), "without choices"),
        (("raw", 200, b'{"object": "error"}'), "without choices"),
    ],
)
async def test_malformed_success_is_an_error_not_a_retry(server, action, wanted):
    server.script = [action]
    async with InferenceClient(server.endpoint, fast()) as client:
        with pytest.raises(InferenceError, match=wanted):
            await client.chat("generator", MESSAGES, Sampling())
    assert len(server.hits) == 1


async def test_persistent_errors_give_up_after_max_attempts(server):
    server.script = [503] * 10
    async with InferenceClient(server.endpoint, fast(max_attempts=3)) as client:
        with pytest.raises(InferenceError) as info:
            await client.chat("generator", MESSAGES, Sampling())
    assert not isinstance(info.value, ServerUnavailable)  # the deadline (5 s) is far away
    assert len(server.hits) == 3
    assert "failed after 3 attempts" in str(info.value) and "HTTP 503" in str(info.value)
    assert client.stats.retries == 2


async def test_persistent_errors_past_the_deadline_are_server_unavailable(server):
    server.script = [503] * 1000
    config = fast(max_attempts=100, deadline_seconds=0.3)
    start = time.monotonic()
    async with InferenceClient(server.endpoint, config) as client:
        with pytest.raises(ServerUnavailable) as info:
            await client.chat("generator", MESSAGES, Sampling())
    assert 0.3 <= time.monotonic() - start < 2
    assert info.value.endpoint == server.endpoint
    assert info.value.last_error.startswith("HTTP 503")
    assert 2 < len(server.hits) < 100


@pytest.mark.parametrize("max_attempts", [1, 3, 8])
async def test_dead_server_fails_after_the_deadline(dead_endpoint, max_attempts):
    # Nothing listening is bounded by the deadline, not by max_attempts (a restarting server takes minutes).
    # The deadline leaves room for many more refused connects than max_attempts even on a loaded machine (each
    # is a fast ECONNREFUSED); the upper bound only says it does not wait far past the deadline.
    config = fast(max_attempts=max_attempts, backoff_seconds=0.02, max_backoff_seconds=0.05, deadline_seconds=1.0)
    start = time.monotonic()
    async with InferenceClient(dead_endpoint, config) as client:
        with pytest.raises(ServerUnavailable) as info:
            await client.chat("generator", MESSAGES, Sampling())
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 6
    assert isinstance(info.value, InferenceError)
    message = str(info.value)
    assert dead_endpoint in message
    assert "ConnectError" in info.value.last_error
    assert f"last error: {info.value.last_error}" in message
    assert client.stats.requests > max_attempts


async def test_concurrent_requests_all_fail_at_the_deadline(dead_endpoint):
    config = fast(concurrency=3, backoff_seconds=0.02, max_backoff_seconds=0.05, deadline_seconds=0.3)
    async with InferenceClient(dead_endpoint, config) as client:
        results = await asyncio.gather(
            *(client.chat("generator", MESSAGES, Sampling()) for _ in range(6)), return_exceptions=True
        )
    assert all(isinstance(r, ServerUnavailable) for r in results), results
    assert client.stats.in_flight == 0


async def test_a_success_restarts_the_deadline(server):
    config = fast(backoff_seconds=0.02, max_backoff_seconds=0.02, deadline_seconds=0.5)
    async with InferenceClient(server.endpoint, config) as client:
        server.script = [503, 503]
        assert (await client.chat("generator", MESSAGES, Sampling())).text == "answer 2"
        await asyncio.sleep(0.6)  # longer than the deadline, but the server answered in between
        server.script = [503, 503]
        assert (await client.chat("generator", MESSAGES, Sampling())).text == "answer 5"
    assert len(server.hits) == 6


# -- backoff ---------------------------------------------------------------------------------------------------------


async def run_failures(server, seed, failures=4, **config):
    server.hits.clear()
    server.script = [503] * failures
    async with InferenceClient(server.endpoint, fast(**config), seed=seed) as client:
        await client.chat("generator", MESSAGES, Sampling())
    return client.stats.backoffs, server.arrivals()


async def test_backoff_doubles_with_jitter(server):
    base = 0.02
    backoffs, arrivals = await run_failures(server, seed=1, backoff_seconds=base, max_backoff_seconds=10)
    assert len(backoffs) == 4 and len(arrivals) == 5
    for i, delay in enumerate(backoffs):
        window = base * 2**i
        assert window / 2 <= delay <= window, (i, delay)  # jitter within the upper half of the window
    assert all(b > a for a, b in zip(backoffs, backoffs[1:])), backoffs  # grows every time
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    for gap, delay in zip(gaps, backoffs):
        assert gap >= delay - 0.002, (gaps, backoffs)  # the client really waited
    assert sum(gaps) >= sum(backoffs) - 0.005


async def test_backoff_is_capped(server):
    backoffs, _ = await run_failures(server, seed=3, failures=6, backoff_seconds=0.01, max_backoff_seconds=0.02)
    assert len(backoffs) == 6
    assert all(delay <= 0.02 for delay in backoffs), backoffs
    assert all(delay >= 0.01 for delay in backoffs[1:]), backoffs  # capped window 0.02: at least half of it


async def test_backoff_jitter_follows_the_seed(server):
    first, _ = await run_failures(server, seed=11)
    again, _ = await run_failures(server, seed=11)
    other, _ = await run_failures(server, seed=12)
    assert first == again
    assert first != other


# -- concurrency -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_concurrency_is_bounded(server, concurrency):
    server.delay = 0.08
    async with InferenceClient(server.endpoint, fast(concurrency=concurrency)) as client:
        requests = [client.chat("generator", MESSAGES, Sampling()) for _ in range(3 * concurrency + 1)]
        gens = await asyncio.gather(*requests)
        assert client.stats.in_flight == 0
    assert len(gens) == len(server.hits) == 3 * concurrency + 1
    assert sorted(g.text for g in gens) == sorted(f"answer {i}" for i in range(len(gens)))
    assert server.max_in_flight == concurrency  # reached, never exceeded


async def test_retries_keep_within_the_concurrency_bound(server):
    server.delay = 0.03
    server.script = [429, 503, 429, 502, 500, 429]
    async with InferenceClient(server.endpoint, fast(concurrency=2)) as client:
        await asyncio.gather(*(client.chat("generator", MESSAGES, Sampling()) for _ in range(6)))
    assert len(server.hits) == 12
    assert server.max_in_flight <= 2


async def test_observe_hook_sees_each_event(server):
    events = []
    server.script = [429]
    async with InferenceClient(server.endpoint, fast(), observe=lambda e, v: events.append((e, v))) as client:
        await client.chat("generator", MESSAGES, Sampling())
    names = [e for e, _ in events]
    assert names.count("start") == 1 and names.count("end") == 1
    assert names.count("retry") == 1 and names.count("ok") == 1 and "failed" not in names
    assert ("tokens", 5) in events
