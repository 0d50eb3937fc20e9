"""A small deterministic OpenAI-compatible chat server on loopback for stage tests: the reply to each
/v1/chat/completions request is `reply(body)` (a function of the request, so runs are reproducible).

As strict as vLLM where the pipeline depends on it (the strictest of its versions): it serves the names in `models`
only (any other is answered 404, as vLLM answers a model it does not serve); continue_final_message without
add_generation_prompt set to false is answered 400 (vLLM's default for it is true, and the two cannot go together);
a context of `context` tokens, listed as `max_model_len` in /v1/models; a request whose prompt plus max_tokens
exceeds it is answered 400 with vLLM's wording; /tokenize (beside /v1, as vLLM's) counts a chat prompt; replies end
at the first stop string and are cut at max_tokens (finish_reason "length"). Tokens are a toy tokenizer's: each CJK
character, each run of ASCII letters or digits, each other non-space character; the chat template adds 4 per message
and 3 for the generation prompt.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_TOKEN = re.compile(r"[\u4e00-\u9fff]|[A-Za-z0-9]+|[^\sA-Za-z0-9\u4e00-\u9fff]")
PER_MESSAGE, GENERATION_PROMPT = 4, 3


def count_tokens(text: str) -> int:
    return sum(1 for _ in _TOKEN.finditer(text))


def prompt_tokens(body: dict) -> int:
    """Tokens of a chat request's rendered prompt (continue_final_message: no generation prompt)."""
    messages = body.get("messages") or []
    tokens = sum(count_tokens(str(m.get("content") or "")) + PER_MESSAGE for m in messages)
    return tokens + (0 if body.get("continue_final_message") else GENERATION_PROMPT)


def cut(text: str, stop: list[str], max_tokens: int) -> tuple[str, str]:
    """The reply as vLLM returns it: up to the first stop string (not included), at most max_tokens tokens."""
    finish = "stop"
    hits = [text.find(s) for s in stop if s and s in text]
    if hits:
        text = text[: min(hits)]
    ends = [m.end() for m in _TOKEN.finditer(text)]
    if len(ends) > max_tokens:
        text, finish = text[: ends[max_tokens - 1]], "length"
    return text, finish


class Refused(Exception):
    """Raised by a reply function: the request is answered 400 with this message (a per-request refusal)."""


class ChatServer:
    def __init__(self, reply: Callable[[dict], str], *, context: int = 32768,
                 models: tuple[str, ...] = ("generator", "extender", "base")):
        self.reply = reply
        self.context = context
        self.models = models  # the served names; a request for another model is answered 404, as vLLM does
        self.requests: list[dict] = []
        self.refusals: list[str] = []  # messages of the 400s answered
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.send(self, 200, {"object": "list", "data": [
                    {"id": name, "object": "model", "max_model_len": server.context}
                    for name in server.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if body.get("model") not in server.models:
                    server.send(self, 404, {"object": "error", "message": f"The model `{body.get('model')}` does "
                                            f"not exist.", "type": "NotFoundError", "param": "model", "code": 404})
                    return
                if body.get("continue_final_message") and body.get("add_generation_prompt", True) is not False:
                    # vLLM's validator refuses both set; left out, add_generation_prompt is True (its default) and
                    # the chat template refuses the pair
                    server.send(self, 400, {"object": "error", "message": "Cannot set both `continue_final_message` "
                                            "and `add_generation_prompt` to True.", "type": "BadRequestError",
                                            "param": None, "code": 400})
                    return
                if self.path == "/tokenize":
                    server.send(self, 200, {"count": prompt_tokens(body), "max_model_len": server.context,
                                            "tokens": []})
                    return
                prompt = prompt_tokens(body)
                max_tokens = body.get("max_tokens")
                max_tokens = server.context - prompt if max_tokens is None else max_tokens
                error = server.refusal(prompt, max_tokens)
                if error:
                    server.send(self, 400, {"object": "error", "message": error, "type": "BadRequestError",
                                            "param": None, "code": 400})
                    return
                try:
                    reply = server.reply(body)
                except Refused as err:
                    server.send(self, 400, {"object": "error", "message": str(err), "type": "BadRequestError",
                                            "param": None, "code": 400})
                    return
                text, finish = cut(reply, list(body.get("stop") or []), max_tokens)
                server.send(self, 200, {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": max(1, count_tokens(text)),
                              "total_tokens": prompt + max(1, count_tokens(text))},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def refusal(self, prompt: int, max_tokens: int) -> str | None:
        """vLLM's 400 for a request that does not fit its context (None when it fits)."""
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return f"max_tokens must be at least 1, got {max_tokens}."
        if max_tokens > self.context:
            return f"max_tokens={max_tokens} cannot be greater than max_model_len={self.context}. " \
                   f"Please request fewer output tokens."
        if prompt + max_tokens > self.context:
            return (f"This model's maximum context length is {self.context} tokens. However, you requested "
                    f"{prompt + max_tokens} tokens ({prompt} in the messages, {max_tokens} in the completion). "
                    f"Please reduce the length of the messages or completion.")
        return None

    def send(self, handler: BaseHTTPRequestHandler, status: int, doc: dict) -> None:
        if status == 400:
            with self.lock:
                self.refusals.append(doc.get("message", ""))
        payload = json.dumps(doc).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        try:
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client cancelled the request (vLLM aborts it)
            handler.close_connection = True

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def chats(self) -> list[dict]:
        """The chat completion requests (not the /tokenize ones)."""
        with self.lock:
            return [r for r in self.requests if r["path"] != "/tokenize"]

    def bodies(self, model: str) -> list[dict]:
        with self.lock:
            return [r["body"] for r in self.requests
                    if r["body"].get("model") == model and r["path"] != "/tokenize"]
