"""Training stages on the tiny local model (CPU, float32, a few steps each): loss mask, LoRA and full fine-tuning,
adapters in the store, iteration k+1 starting from iteration k, resume from a stored checkpoint."""

import json
import math
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

from selflengthen.pipeline.config import RunConfig  # noqa: E402
from selflengthen.pipeline.stages import StageContext, StageError, run_stage  # noqa: E402
from selflengthen.pipeline.stages.build_sft import sft_artifacts  # noqa: E402
from selflengthen.pipeline.store import LocalStore, dumps_jsonl, read_jsonl  # noqa: E402
from selflengthen.pipeline.training import (  # noqa: E402
    IGNORE_INDEX,
    PadCollator,
    TrainingError,
    encode_conversation,
    fetch_trained_model,
    fit_cutoff,
    load_examples,
    model_prefix,
    stored_checkpoints,
    train_role,
)
from selflengthen.pipeline.treestore import download_tree, tree_complete, upload_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    os.environ.setdefault("SELFLENGTHEN_CACHE", str(REPO / ".cache"))
    from selflengthen.pipeline.tinymodel import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def conversations(n: int, offset: int = 0) -> list[dict]:
    return [{"id": f"x{i}", "language": "en", "messages": [
        {"role": "user", "content": f"Write about topic {i}."},
        {"role": "assistant", "content": f"Topic {i} is a fine topic.\n\nIt has many parts, and we discuss them all."},
    ]} for i in range(offset, offset + n)]


def make_ctx(root: Path, iteration: int = 1, training: dict | None = None, name: str = "t") -> StageContext:
    cfg = RunConfig.model_validate({
        "name": name, "seed": 3, "storage": {"uri": f"file://{root}/store"},
        "training": {"learningRate": 3e-3, "maxSteps": 12, "saveSteps": 100, "cutoffTokens": 256,
                     "lora": {"rank": 4, "alpha": 8}, **(training or {})},
    })
    return StageContext(config=cfg, iteration=iteration, store=LocalStore(root / "store"))


def add_sft_data(ctx: StageContext, rows: list[dict]) -> None:
    for role in ("generator", "extender"):
        sft_artifacts(ctx, role).write_outputs(rows, 64)
    ctx.artifacts("build-sft").finish({"counts": {}})


class Recorder(TrainerCallback):
    """Records the first step trained in this session and the trainable state at the start of training."""

    def __init__(self, raise_after: int | None = None):
        self.raise_after = raise_after
        self.first_step = None
        self.initial_state = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from peft import PeftModel, get_peft_model_state_dict

        if isinstance(model, PeftModel):
            self.initial_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        else:
            self.initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step is None:
            self.first_step = state.global_step
        if self.raise_after is not None and state.global_step >= self.raise_after:
            raise KeyboardInterrupt(f"interrupted after step {state.global_step}")


# -- data ------------------------------------------------------------------------------------------------------------


def test_loss_mask_covers_only_the_assistant_turns(tokenizer):
    messages = [{"role": "user", "content": "Write a poem."}, {"role": "assistant", "content": "Roses are red.\n\nSky."}]
    ex = encode_conversation(tokenizer, messages)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=True, return_dict=False, add_generation_prompt=True)
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Roses are red.\n\nSky.<|im_end|>\n"

    multi = messages + [{"role": "user", "content": "Another."}, {"role": "assistant", "content": "Violets."}]
    ex = encode_conversation(tokenizer, multi)
    learned = tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    assert learned == "Roses are red.\n\nSky.<|im_end|>\nViolets.<|im_end|>\n"
    # the user turns and the role headers are never learned
    masked = tokenizer.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label == IGNORE_INDEX])
    assert "Write a poem." in masked and "Another." in masked and "Violets" not in masked

    # over the cutoff the answer stays whole: the prompt gives way, or the example is left out
    assert encode_conversation(tokenizer, messages, cutoff=len(prompt) + 2) is None


def test_over_the_cutoff_the_prompt_is_cut_and_the_answer_never(tokenizer):
    answer = "Roses are red, violets are blue, the garden grows in morning dew.\n\nThe end."
    messages = [{"role": "user", "content": "Extend this answer please: " + "the river runs to the sea. " * 30},
                {"role": "assistant", "content": answer}]
    whole = encode_conversation(tokenizer, messages)
    learned = [t for t in whole["labels"] if t != IGNORE_INDEX]
    cutoff = len(whole["input_ids"]) - 40
    ex, outcome = fit_cutoff(whole, cutoff)
    assert outcome == "prompt-cut" and len(ex["input_ids"]) == cutoff
    assert [t for t in ex["labels"] if t != IGNORE_INDEX] == learned  # every answer token, end-of-turn included
    assert tokenizer.decode(learned).endswith("The end.<|im_end|>\n")
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith(tokenizer.decode(whole["input_ids"][:whole["prompt_span"][0]]))  # the template intact
    assert "<|im_start|>assistant\n" + answer in text
    assert fit_cutoff(whole, len(whole["input_ids"])) == (whole, "fits")
    assert fit_cutoff(whole, len(learned) + 4) == (None, "dropped")  # the answer alone nearly fills it


def test_load_examples_counts_what_the_cutoff_did(tokenizer, tmp_path):
    store = LocalStore(tmp_path)
    short = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello there."}]
    long_prompt = [{"role": "user", "content": "Extend: " + "word " * 200}, {"role": "assistant", "content": "Ok."}]
    long_answer = [{"role": "user", "content": "Write."}, {"role": "assistant", "content": "word " * 200}]
    store.write("x/part-00000.jsonl", dumps_jsonl([{"messages": m} for m in (short, long_prompt, long_answer)]))
    examples, counts = load_examples(store, "x", tokenizer, 96)
    assert (counts["rows"], counts["examples"], counts["promptCut"], counts["droppedOverLength"]) == (3, 2, 1, 1)
    assert all(len(e["input_ids"]) <= 96 for e in examples)
    # every kept example learns its whole answer, up to and including the end-of-turn token
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ex, messages in zip(examples, (short, long_prompt)):
        learned = [int(t) for t in ex["labels"] if t != IGNORE_INDEX]
        assert learned == [t for t in encode_conversation(tokenizer, messages)["labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(learned) == messages[-1]["content"] + "<|im_end|>\n"
        assert end_of_turn in learned[-2:] and ex["input_ids"][len(ex["input_ids"]) - len(learned):].tolist() == learned


def test_pad_collator():
    batch = PadCollator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                   {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert PadCollator(0, multiple_of=8)([{"input_ids": [1], "labels": [1]}])["input_ids"].shape == (1, 8)


def test_tree_roundtrip(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 1000)
    (src / "sub" / "b.json").write_text("{}")
    upload_tree(store, src, "run/tree", meta={"mode": "lora"})
    assert tree_complete(store, "run/tree")
    out = download_tree(store, "run/tree", tmp_path / "out")
    assert (out / "a.bin").read_bytes() == b"x" * 1000 and (out / "sub" / "b.json").read_text() == "{}"
    # a second upload replaces the tree (stale files go); a partial tree is never downloaded
    (src / "a.bin").unlink()
    upload_tree(store, src, "run/tree")
    assert not store.exists("run/tree/a.bin")
    assert not (download_tree(store, "run/tree", tmp_path / "out") / "a.bin").exists()
    store.write("run/partial/a.bin", b"1")
    with pytest.raises(FileNotFoundError, match="_COMPLETE"):
        download_tree(store, "run/partial", tmp_path / "p")


def test_tree_roundtrip_on_s3(tmp_path, s3_endpoint):
    """Through boto3's managed transfer: a file above the multipart threshold (8 MiB) and a nested one."""
    from selflengthen.pipeline.store import S3Store

    store = S3Store("runs", "trees", endpoint_url=s3_endpoint)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    big = os.urandom(9 * 2**20)
    (src / "model.safetensors").write_bytes(big)
    (src / "sub" / "config.json").write_text('{"a": 1}')
    upload_tree(store, src, "run/iter-01/train-generator/model", meta={"mode": "full"})
    assert tree_complete(store, "run/iter-01/train-generator/model")
    out = download_tree(store, "run/iter-01/train-generator/model", tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == big
    assert (out / "sub" / "config.json").read_text() == '{"a": 1}'


# -- LoRA ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """Iteration 1 of the generator, LoRA, 12 steps on 4 repeated examples (through run_stage)."""
    root = tmp_path_factory.mktemp("lora")
    patch = pytest.MonkeyPatch()
    patch.setenv("SELFLENGTHEN_WORKDIR", str(root / "work"))
    ctx = make_ctx(root)
    add_sft_data(ctx, conversations(4))
    manifest = run_stage("train-generator", ctx)
    yield root, ctx, manifest
    patch.undo()


def test_lora_training_learns_and_stores_the_adapter(lora_run, tiny_model):
    root, ctx, manifest = lora_run
    store = ctx.store
    assert ctx.artifacts("train-generator").done()
    assert manifest["mode"] == "lora" and manifest["steps"] == 12 and manifest["resumedFromStep"] is None
    assert 0 < manifest["trainableParams"] < manifest["totalParams"]
    assert manifest["counts"]["examples"] == 4
    assert manifest["gradientCheckpointing"] == {"enabled": False, "reason": "auto on the CPU: off",
                                                 "estimateGiB": None, "checkpointedGiB": None, "budgetGiB": None,
                                                 "layers": 0, "ofLayers": 2, "lossChunk": 0,
                                                 "forwards": {"byLayers": {}, "chunkedLoss": 0}}

    history = list(read_jsonl(store, "t/iter-01/train-generator/train-log.jsonl"))
    assert [e["step"] for e in history] == list(range(1, 13))
    for entry in history:
        assert entry["tokensPerSecond"] > 0 and entry["samplesPerSecond"] > 0 and entry["learningRate"] is not None
    first, last = [e["loss"] for e in history[:3]], [e["loss"] for e in history[-3:]]
    assert sum(last) / 3 < 0.9 * sum(first) / 3  # the loss goes down on the repeated data
    assert manifest["finalLoss"] == history[-1]["loss"]
    # The report's numbers: one mean per epoch, falling (a single batch-1 step says little)
    epochs = manifest["epochLosses"]
    assert len(epochs) == math.ceil(manifest["epochs"] - 1e-6) >= 2 and epochs[-1] < epochs[0]
    assert epochs[0] == pytest.approx(sum(e["loss"] for e in history if e["epoch"] <= 1 + 1e-6)
                                      / sum(1 for e in history if e["epoch"] <= 1 + 1e-6), abs=1e-4)

    # the adapter is in the store, complete; the checkpoints were superseded by it
    assert tree_complete(store, model_prefix("t", 1, "generator"))
    assert manifest["modelUri"] == f"{store.uri}/t/iter-01/train-generator/model"
    assert stored_checkpoints(store, "t", 1, "generator") == []

    # ... and reloads with peft: its trained LoRA B matrices are not the zeros they start from
    from peft import PeftModel

    fetched = fetch_trained_model(ctx.config, store, 1, "generator", workdir=root / "serve")
    assert fetched.mode == "lora" and fetched.base == str(tiny_model)
    assert (fetched.path / "adapter_config.json").is_file()
    adapter = load_file(fetched.path / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(fetched.path)).eval()
        after = peft_model(ids).logits
    assert not torch.allclose(before, after)
    # merged weights give the same logits (what a full-model server would serve)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                       str(fetched.path)).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, after, rtol=1e-4, atol=1e-4)


def test_stage_after_model_upload_does_not_train_again(lora_run):
    root, ctx, manifest = lora_run
    # a crash after the model upload but before _SUCCESS: the rerun picks up the stored result
    ctx.store.delete("t/iter-01/train-generator/_SUCCESS")
    again = run_stage("train-generator", ctx)
    assert again["steps"] == manifest["steps"] and again["finalLoss"] == manifest["finalLoss"]
    assert again["trainSeconds"] == manifest["trainSeconds"]


def test_iteration_2_starts_from_the_iteration_1_adapter(lora_run):
    root, ctx1, _ = lora_run
    ctx2 = make_ctx(root, iteration=2, training={"maxSteps": 2})
    add_sft_data(ctx2, conversations(3, offset=10))
    recorder = Recorder()
    manifest = train_role(ctx2, "generator", callbacks=[recorder])
    stored = load_file(root / "store/t/iter-01/train-generator/model/adapter_model.safetensors")
    assert set(recorder.initial_state) == set(stored)
    for key, value in stored.items():
        torch.testing.assert_close(recorder.initial_state[key], value, rtol=0, atol=0)
    assert manifest["initFrom"].endswith("t/iter-01/train-generator/model")
    # ... and it trained on from there
    after = load_file(root / "store/t/iter-02/train-generator/model/adapter_model.safetensors")
    assert any(not torch.equal(after[k], stored[k]) for k in stored)


def test_iteration_2_needs_the_iteration_1_model(tmp_path, tiny_model):
    ctx = make_ctx(tmp_path, iteration=2)
    add_sft_data(ctx, conversations(2))
    with pytest.raises(StageError, match="iteration 1"):
        run_stage("train-extender", ctx)


def test_training_needs_build_sft(tmp_path):
    with pytest.raises(StageError, match="build-sft"):
        run_stage("train-generator", make_ctx(tmp_path))


def test_interrupted_training_resumes_from_the_stored_checkpoint(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("SELFLENGTHEN_WORKDIR", str(tmp_path / "work"))
    ctx = make_ctx(tmp_path, training={"maxSteps": 8, "saveSteps": 3})
    add_sft_data(ctx, conversations(4))
    interrupted = Recorder(raise_after=5)
    with pytest.raises(KeyboardInterrupt):
        train_role(ctx, "extender", callbacks=[interrupted])
    store = ctx.store
    assert stored_checkpoints(store, "t", 1, "extender") == [3]  # step 3 was saved and uploaded; 5 was not
    assert not tree_complete(store, model_prefix("t", 1, "extender"))
    assert not ctx.artifacts("train-extender").done()

    # The local work directory is lost too (a new pod): only the store remains.
    import shutil

    shutil.rmtree(tmp_path / "work")
    resumed = Recorder()
    manifest = train_role(ctx, "extender", callbacks=[resumed])
    assert resumed.first_step == 4  # continues after the checkpoint, not from 0
    assert manifest["resumedFromStep"] == 3 and manifest["steps"] == 8
    history = list(read_jsonl(store, "t/iter-01/train-extender/train-log.jsonl"))
    assert [e["step"] for e in history] == list(range(1, 9))

    # The same training without the interruption ends with the same weights.
    straight = make_ctx(tmp_path / "straight", training={"maxSteps": 8, "saveSteps": 3})
    add_sft_data(straight, conversations(4))
    train_role(straight, "extender")
    a = load_file(tmp_path / "store/t/iter-01/train-extender/model/adapter_model.safetensors")
    b = load_file(tmp_path / "straight/store/t/iter-01/train-extender/model/adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


class CheckpointingSeen(TrainerCallback):
    """What the model does: whether its decoder layers recompute, after the first step's forward."""

    def __init__(self):
        self.seen = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.seen is None:
            from selflengthen.pipeline.training_recompute import decoder_layers

            self.seen = (model.is_gradient_checkpointing,
                         all(layer.gradient_checkpointing for layer in decoder_layers(model)))


def test_the_trainer_gets_the_chosen_checkpointing_and_the_weights_do_not_depend_on_it(tmp_path, tiny_model,
                                                                                        monkeypatch):
    adapters, seen, forwards = {}, {}, {}
    for setting in ("true", "false"):
        monkeypatch.setenv("SELFLENGTHEN_WORKDIR", str(tmp_path / setting / "work"))
        ctx = make_ctx(tmp_path / setting, training={"gradientCheckpointing": setting, "maxSteps": 3})
        add_sft_data(ctx, conversations(3))
        callback = CheckpointingSeen()
        manifest = train_role(ctx, "generator", callbacks=[callback])
        seen[setting] = (*callback.seen, manifest["gradientCheckpointing"]["enabled"])
        forwards[setting] = manifest["gradientCheckpointing"]["forwards"]
        fetched = fetch_trained_model(ctx.config, ctx.store, 1, "generator", workdir=tmp_path / setting / "serve")
        adapters[setting] = load_file(fetched.path / "adapter_model.safetensors")
    # true: every layer (also on the CPU), false: none (auto on the CPU: off,
    # test_lora_training_learns_and_stores_the_adapter). The model really recomputes when it is on.
    assert seen == {"true": (True, True, True), "false": (False, False, False)}
    # true: each of the 3 forwards (batch 1) checkpointed both layers and computed its loss in chunks
    assert forwards == {"true": {"byLayers": {"2": 3}, "chunkedLoss": 3}, "false": {"byLayers": {}, "chunkedLoss": 0}}
    # recomputing the same activations changes nothing the run keeps (why the field affects no stage)
    for key, value in adapters["false"].items():
        torch.testing.assert_close(adapters["true"][key], value, rtol=1e-5, atol=1e-6)


# -- full fine-tuning ------------------------------------------------------------------------------------------------


def test_full_fine_tuning_smoke(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("SELFLENGTHEN_WORKDIR", str(tmp_path / "work"))
    ctx = make_ctx(tmp_path, training={"mode": "full", "maxSteps": 2, "learningRate": 1e-4})
    add_sft_data(ctx, conversations(2))
    manifest = run_stage("train-generator", ctx)
    assert manifest["mode"] == "full" and manifest["steps"] == 2
    assert manifest["trainableParams"] == manifest["totalParams"]
    fetched = fetch_trained_model(ctx.config, ctx.store, 1, "generator", workdir=tmp_path / "serve")
    assert fetched.mode == "full" and fetched.base == str(fetched.path)
    model = AutoModelForCausalLM.from_pretrained(fetched.path)  # a whole model, with its tokenizer
    AutoTokenizer.from_pretrained(fetched.path)
    assert json.loads((fetched.path / "config.json").read_text())["model_type"] == "qwen2"

    # iteration 2 starts from the iteration 1 weights
    ctx2 = make_ctx(tmp_path, iteration=2, training={"mode": "full", "maxSteps": 1})
    add_sft_data(ctx2, conversations(2, offset=5))
    recorder = Recorder()
    train_role(ctx2, "generator", callbacks=[recorder])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(recorder.initial_state[key], value, rtol=0, atol=0)


def test_train_role_rejects_empty_data(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("SELFLENGTHEN_WORKDIR", str(tmp_path / "work"))
    ctx = make_ctx(tmp_path)
    add_sft_data(ctx, [])
    with pytest.raises(TrainingError, match="no training examples"):
        train_role(ctx, "generator")


# -- distributed -----------------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, os, sys
from selflengthen.pipeline.config import RunConfig
from selflengthen.pipeline.stages import StageContext, run_stage
from selflengthen.pipeline.store import LocalStore
root = sys.argv[1]
cfg = RunConfig.model_validate({"name": "t", "seed": 3, "storage": {"uri": f"file://{root}/store"},
    "training": {"maxSteps": 4, "saveSteps": 2, "learningRate": 3e-3, "cutoffTokens": 256, "lora": {"rank": 4}}})
manifest = run_stage("train-generator", StageContext(config=cfg, iteration=1, store=LocalStore(root + "/store")))
# a file per rank: the two ranks share torchrun's stdout, where their lines can interleave (seen in CI)
with open(f"{root}/manifest-{os.environ['RANK']}.json", "w") as out:
    json.dump({k: manifest[k] for k in ("steps", "finalLoss", "worldSize", "modelUri")}, out)
"""


def test_distributed_data_parallel_training(tmp_path, tiny_model):
    """Two CPU ranks under torchrun (gloo): the HF Trainer shards the data, rank 0 uploads checkpoints and the
    model, and every rank returns rank 0's manifest."""
    import signal
    import socket
    import subprocess
    import sys

    ctx = make_ctx(tmp_path)
    add_sft_data(ctx, conversations(8))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "SELFLENGTHEN_WORKDIR": str(tmp_path / "work"), "OMP_NUM_THREADS": "1",
           "PYTHONSAFEPATH": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # A session of its own, so that a hang ends with the whole group (torchrun and its workers) killed.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun timed out:\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    manifests = [json.loads((tmp_path / f"manifest-{rank}.json").read_text()) for rank in (0, 1)]
    assert len(manifests) == 2 and manifests[0] == manifests[1]
    assert manifests[0]["worldSize"] == 2 and manifests[0]["steps"] == 4 and manifests[0]["finalLoss"] is not None
    assert tree_complete(ctx.store, model_prefix("t", 1, "generator"))
    history = list(read_jsonl(ctx.store, "t/iter-01/train-generator/train-log.jsonl"))
    assert [e["step"] for e in history] == [1, 2, 3, 4]
    assert history[0]["samplesPerSecond"] > 0  # 2 ranks x 1 example per step


def test_trainer_settings_map_the_configuration_to_training_arguments():
    """TRL's config-to-arguments idea: one dataclass of the trainer's settings (training_args.TrainerSettings), made
    from `training.*` and the stage's seeds, turned into TrainingArguments."""
    from selflengthen.pipeline.training_args import TrainerSettings

    t = RunConfig.model_validate({"training": {"batchSize": 2, "gradientAccumulationSteps": 3, "warmupRatio": 0.2,
                                               "groupByLength": False, "keepCheckpoints": 4}}).training
    settings = TrainerSettings.of(t, output_dir="/tmp/unused", precision="bf16", cuda=False, seed=2**31 + 7,
                                  data_seed=9)
    args = settings.arguments()
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.warmup_steps) == (2, 3, 0.2)
    assert args.train_sampling_strategy == "random" and args.save_total_limit == 4 and args.bf16 and args.use_cpu
    assert (args.seed, args.data_seed) == (7, 9)  # seeds folded into the range the Trainer takes
    assert not args.gradient_checkpointing and not args.remove_unused_columns
