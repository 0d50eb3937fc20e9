"""The simulated vLLM's HTTP side: OpenAI-compatible endpoints over HTTP/1.1 keep-alive on asyncio streams,
answering with sim_text's text after the delay sim_engine computes; `main` is the server process's entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import time

from .sim_engine import Engine, SimModel
from .sim_text import _markers, context_refusal, generate, prompt_tokens_of, sentence_bank


class SimHTTP:
    def __init__(self, model: SimModel, served: tuple[str, ...] = ("generator", "extender", "base")):
        self.model = model
        self.served = served
        self.engine: Engine | None = None
        self.error_rng = random.Random(model.seed + 17)
        self.ids = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                status, ctype, payload = await self.route(method, path.split("?", 1)[0], raw)
                close = headers.get("connection", "").lower() == "close"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                    f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode() + payload
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def route(self, method: str, path: str, raw: bytes) -> tuple[str, str, bytes]:
        if path == "/health":
            return "200 OK", "text/plain", b""
        if path == "/v1/models":
            data = [{"id": name, "object": "model", "owned_by": "sim", "max_model_len": self.model.max_model_len}
                    for name in self.served]
            return "200 OK", "application/json", json.dumps({"object": "list", "data": data}).encode()
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4", self.metrics().encode()
        if path == "/sim/stats":
            return "200 OK", "application/json", json.dumps(self.engine.snapshot()).encode()
        if path == "/sim/reset" and method == "POST":
            self.engine.reset()
            return "200 OK", "application/json", b"{}"
        if path == "/v1/chat/completions" and method == "POST":
            return await self.chat(raw)
        if path == "/tokenize" and method == "POST":  # vLLM's, beside /v1: a chat prompt's tokens
            body = json.loads(raw)
            count = prompt_tokens_of(body.get("messages") or [])
            doc = {"count": count, "max_model_len": self.model.max_model_len, "tokens": []}
            return "200 OK", "application/json", json.dumps(doc).encode()
        return "404 Not Found", "application/json", b'{"error": {"message": "not found"}}'

    def metrics(self) -> str:
        """vLLM's scheduler gauges in Prometheus' text format, one series per served model as vLLM labels them."""
        e = self.engine
        e.advance()
        values = {"vllm:num_requests_running": e.admitted, "vllm:num_requests_waiting": len(e.waiting),
                  "vllm:kv_cache_usage_perc": e.kv_usage()}
        lines = []
        for name, value in values.items():
            lines.append(f"# TYPE {name} gauge")
            lines += [f'{name}{{engine="0",model_name="{model}"}} {float(value)}' for model in self.served[:1]]
        return "\n".join(lines) + "\n"

    async def chat(self, raw: bytes) -> tuple[str, str, bytes]:
        try:
            body = json.loads(raw)
        except ValueError:
            return "400 Bad Request", "application/json", b'{"error": {"message": "invalid JSON"}}'
        if body.get("model") not in self.served:
            return "404 Not Found", "application/json", b'{"error": {"message": "model not found"}}'
        if self.model.error_rate and self.error_rng.random() < self.model.error_rate:
            self.engine.stats.errors += 1
            return "503 Service Unavailable", "application/json", b'{"error": {"message": "overloaded"}}'
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16384
        refusal = context_refusal(self.model, prompt_tokens_of(body.get("messages") or []), int(max_tokens))
        if refusal:
            self.engine.stats.refused += 1
            return "400 Bad Request", "application/json", json.dumps({"object": "error", "message": refusal,
                                                                     "code": 400}).encode()
        text, tokens, prompt_tokens, finish, kind = generate(self.model, body, raw)
        await self.engine.submit(prompt_tokens, tokens, kind)
        self.ids += 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        rid, created = f"chatcmpl-sim-{self.ids}", int(time.time())
        if body.get("stream"):  # the whole event stream at once, after the simulated latency
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "finish_reason": finish}]}
            events = [chunk, {"id": rid, "object": "chat.completion.chunk", "created": created,
                              "model": body["model"], "choices": [], "usage": usage}]
            payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return "200 OK", "text/event-stream", payload.encode()
        answer = {"id": rid, "object": "chat.completion", "created": created, "model": body["model"],
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": finish}],
                  "usage": usage}
        return "200 OK", "application/json", json.dumps(answer).encode()

    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None) -> None:
        self.engine = Engine(self.model)
        sentence_bank(), _markers()  # build before the first request
        server = await asyncio.start_server(self.handle, host, port, backlog=1024)
        if ready:
            ready.set()
        async with server:
            await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=SimModel().to_json(), help="SimModel as JSON")
    args = parser.parse_args(argv)
    model = SimModel.from_json(args.model)
    try:
        import uvloop  # a faster event loop (vLLM's dependency) when present: the server is not what we measure

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # nothing to flush
    try:
        runner(SimHTTP(model).serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
