"""A simulated vLLM: a deterministic, seeded OpenAI-compatible server on loopback for the benchmarks, and its
launcher (SimServer: a subprocess on a free port, a context manager).

The parts, one module each: bench/sim_engine.py (SimModel and the engine: continuous batching within a KV cache,
prefill, processor-shared decoding in simulated time), bench/sim_text.py (what the "model" writes),
bench/sim_http.py (the endpoints and the server process).

Endpoints: POST /v1/chat/completions (also "stream": true, as a whole SSE body once done), GET /v1/models,
POST /tokenize, GET /health, GET /metrics (vLLM's scheduler gauges under vLLM's names: vllm:num_requests_running,
admitted; vllm:num_requests_waiting; vllm:kv_cache_usage_perc, the KV cache's used share 0-1: prompts and tokens
decoded so far of the admitted requests), GET /sim/stats (tokens, requests, time-weighted concurrency), POST
/sim/reset.

Run it with SimServer, or `python bench/sim_server.py --port P`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: `python bench/sim_server.py` runs this file outside the package
    from .sim_engine import SimModel

ROOT = Path(__file__).resolve().parent.parent


class SimServer:
    """The simulated server as a subprocess of its own (its CPU does not compete with the client's event loop
    for the GIL). `with SimServer(model) as sim: sim.endpoint`."""

    def __init__(self, model: SimModel | None = None, port: int = 0, host: str = "127.0.0.1"):
        from selflengthen.pipeline.serving import free_port

        from .sim_engine import SimModel

        self.model = model or SimModel()
        self.host = host  # any loopback address (127.0.0.2, ...): replicas on one port, as pods behind a Service
        self.port = port or free_port()
        self.base = f"http://{host}:{self.port}"
        self.endpoint = f"{self.base}/v1"
        self.process: subprocess.Popen | None = None

    def start(self) -> SimServer:
        import httpx

        code = f"import sys; sys.path.append({str(ROOT)!r}); from bench.sim_http import main; main()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "--host", self.host, "--port", str(self.port), "--model",
             self.model.to_json()],
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONSAFEPATH": "1"},
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"simulated server exited with code {self.process.returncode}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("simulated server not healthy after 60 s")
            time.sleep(0.05)

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.base}/sim/stats", timeout=30).json()

    def reset(self) -> None:
        import httpx

        httpx.post(f"{self.base}/sim/reset", timeout=30)

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from bench.sim_http import main

    main()
