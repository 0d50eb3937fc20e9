"""The reference implementation's driver model, as a baseline for the saturation benchmark.

What the published Self-Lengthen scripts do (the authors' reference code), modelled on the same requests:
- a fixed `concurrent.futures.ThreadPoolExecutor` per stage, each worker making blocking HTTP requests
  (the reference uses the blocking openai client, i.e. httpx.Client, shared by all threads);
- each stage finishes completely before the next starts, and self-instruct runs in batches of 500 slots with a
  barrier after each batch;
- retries are recursive calls with no backoff (self-instruct 10, respond 20, extend 20 tries), and self-instruct
  always asks the judge, whatever the length of the instruction.
It asks the same questions as our stages (same prompts, same per-request seeds, same filters and the same seeded
drop_short on the same item order), so both drivers generate nearly the same tokens and wall time compares the
driving only. (The reference also kills its own process at 95 % progress to cut the tail; that drops 5 % of
the work, so it is not modelled: every stage here finishes its items.)
"""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from selflengthen.pipeline import prompts
from selflengthen.pipeline.config import RunConfig
from selflengthen.pipeline.data import load_seed_instructions
from selflengthen.pipeline.stages import StageContext
from selflengthen.pipeline.stages.common import reject_reason
from selflengthen.pipeline.stages.extend import first_half, kept_part
from selflengthen.pipeline.text import count_words, drop_short_mask

SELF_INSTRUCT_BATCH = 500


class Reference:
    def __init__(self, config: RunConfig, endpoint: str, workers: int, workdir: Path):
        self.config = config
        self.workers = workers
        self.workdir = workdir
        self.ctx = StageContext(config=config, iteration=1, store=None)  # only for reject_reason and seeds
        self.http = httpx.Client(
            base_url=endpoint, timeout=config.client.request_timeout_seconds,
            limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers),
        )
        self.requests = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    # -- one blocking request ---------------------------------------------------------------------------------------

    def chat(self, model: str, messages: list[dict], max_tokens: int | None, seed: int,
             continue_final: bool = False) -> str:
        s = self.config.sampling
        body = {"model": model, "messages": messages, "temperature": s.temperature, "top_p": s.top_p,
                "top_k": s.top_k, "repetition_penalty": s.repetition_penalty,
                "max_tokens": max_tokens or s.max_tokens, "seed": seed}
        if continue_final:
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        response = self.http.post("/chat/completions", json=body)
        response.raise_for_status()
        with self._lock:
            self.requests += 1
        return response.json()["choices"][0]["message"]["content"] or ""

    def save(self, name: str, rows: list[dict]) -> None:
        with open(self.workdir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # -- stages, each with its own pool and a barrier at its end --------------------------------------------------

    def self_instruct(self) -> list[dict]:
        cfg, si = self.config, self.config.self_instruct
        pool = [r["prompt"].strip() for r in load_seed_instructions("en", si.seed_file)]
        lock = threading.Lock()

        def task(j: int, tries: int = si.max_tries) -> dict | None:
            if tries == 0:
                return None
            attempt = si.max_tries - tries
            rng = random.Random(self.ctx.seed("self-instruct", j, attempt))
            with lock:
                examples = rng.sample(pool, k=min(si.few_shot, len(pool)))
            text = self.chat(cfg.models.generator, prompts.self_instruct_messages("en", examples), si.max_tokens,
                             rng.getrandbits(31), continue_final=True)
            instruction = prompts.parse_instruction(text).split("\n", 1)[0].strip()  # the reference: first line
            verdict = self.chat(cfg.models.generator, [{"role": "user", "content": prompts.render(
                "en", "judge", instruction=instruction)}], 8, rng.getrandbits(31))
            if prompts.parse_judgement(verdict) and si.min_words < count_words(instruction) < si.max_words:
                with lock:
                    pool.append(instruction)
                return {"id": f"i01-{j:07d}", "language": "en", "instruction": instruction}
            return task(j, tries - 1)

        accepted: list[dict] = []
        total = si.instructions_per_iteration
        for start in range(0, total, SELF_INSTRUCT_BATCH):
            with ThreadPoolExecutor(max_workers=self.workers) as pool_exec:
                batch = list(pool_exec.map(task, range(start, min(total, start + SELF_INSTRUCT_BATCH))))
            accepted += [r for r in batch if r]
        self.save("instructions", accepted)
        return accepted

    def respond(self, instructions: list[dict]) -> list[dict]:
        cfg = self.config

        def task(item: dict, k: int, tries: int = cfg.respond.max_retries) -> dict | None:
            if tries == 0:
                return None
            attempt = cfg.respond.max_retries - tries
            text = self.chat(cfg.models.generator, [{"role": "user", "content": item["instruction"]}],
                             cfg.respond.max_tokens, self.ctx.seed("respond", item["id"], k, attempt))
            if reject_reason(self.ctx, text) is not None:
                return task(item, k, tries - 1)
            text = text.strip()
            return {"id": f"{item['id']}-s{k}", "language": "en", "instruction": item["instruction"],
                    "response": text, "words": count_words(text)}

        jobs = [(item, k) for item in instructions for k in range(cfg.respond.samples_per_instruction)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool_exec:
            results = list(pool_exec.map(lambda job: task(*job), jobs))
        kept = self._drop_short([r for r in results if r], "respond", "response")
        self.save("initial_responses", kept)
        return kept

    def extend(self, responses: list[dict]) -> list[dict]:
        cfg, ext = self.config, self.config.extend
        model = cfg.models.extender

        def extend_once(item: dict, a: int, retry: int) -> str | None:
            current = initial = item["response"]
            for p in range(ext.passes):
                seed = self.ctx.seed("extend", item["id"], a, retry, p)
                former = self.chat(model, [{"role": "user", "content": prompts.render(
                    "en", "extend", instruction=item["instruction"], response=first_half(current))}],
                    ext.max_tokens, seed)
                prefix = kept_part(former, ext.keep_fraction)
                if not prefix:
                    continue
                latter = self.chat(model, [
                    {"role": "user", "content": prompts.render("en", "extend", instruction=item["instruction"],
                                                               response=current)},
                    {"role": "assistant", "content": prefix}], ext.max_tokens, seed + 1, continue_final=True)
                candidate = (prefix + latter).strip()
                if reject_reason(self.ctx, candidate) is None and count_words(candidate) > count_words(current):
                    current = candidate
            return current if count_words(current) > ext.min_growth * count_words(initial) else None

        def task(item: dict, a: int, tries: int = ext.max_retries) -> dict | None:
            if tries == 0:
                return None
            extended = extend_once(item, a, ext.max_retries - tries)
            if extended is None:
                return task(item, a, tries - 1)
            return {"id": f"{item['id']}-a{a}", "instruction": item["instruction"], "initial": item["response"],
                    "extended": extended, "words": count_words(extended)}

        jobs = [(item, a) for item in responses for a in range(ext.attempts)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool_exec:
            results = list(pool_exec.map(lambda job: task(*job), jobs))
        kept = self._drop_short([r for r in results if r], "extend", "extended")
        self.save("extended_responses", kept)
        return kept

    def _drop_short(self, rows: list[dict], stage: str, key: str) -> list[dict]:
        if not self.config.filters.drop_short or not rows:
            return rows
        mask = drop_short_mask([count_words(r[key]) for r in rows], self.ctx.seed(stage, "drop-short"))
        return [r for r, keep in zip(rows, mask) if keep]
