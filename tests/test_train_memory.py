"""training.gradientCheckpointing auto: the memory estimate (its activation coefficients re-measured on real Qwen2
models with autograd's saved-tensor hooks) and the decision on the cases that matter (0.5B and 7B, LoRA and full,
80 GiB and 24 GiB devices)."""

import contextlib
import json

import pytest

from selflengthen.pipeline.config import RunConfig, parse_config
from selflengthen.pipeline.train_memory import (
    ACTIVATION_BYTES,
    LOSS_SAVED,
    GiB,
    ModelShape,
    decide,
    estimate,
    layer_bytes_per_token,
    layer_input_bytes,
    zero_stage,
)

# Qwen2-0.5B and Qwen2-7B as their configs state them; parameters as transformers counts them, plus the LoRA
# (rank 8 on all linear layers) adapters where trainable says so.
LORA_05B = 24 * 8 * (2 * (896 + 896) + 2 * (896 + 128) + 3 * (896 + 4864))
LORA_7B = 28 * 8 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
Q05 = dict(layers=24, hidden=896, intermediate=4864, kv=128, vocab=151936)
Q7 = dict(layers=28, hidden=3584, intermediate=18944, kv=512, vocab=152064)
SHAPES = {
    ("0.5B", "lora"): ModelShape(params=494_032_768 + LORA_05B, trainable=LORA_05B, lora_rank=8, **Q05),
    ("0.5B", "full"): ModelShape(params=494_032_768, trainable=494_032_768, **Q05),
    ("7B", "lora"): ModelShape(params=7_615_616_512 + LORA_7B, trainable=LORA_7B, lora_rank=8, **Q7),
    ("7B", "full"): ModelShape(params=7_615_616_512, trainable=7_615_616_512, **Q7),
}


@pytest.mark.parametrize(("model", "mode", "tokens", "gib", "zero", "ranks", "enabled", "fits"), [
    ("0.5B", "lora", 16384, 80, 0, 1, False, True),  # the cutoff's whole 16k tokens fit an 80 GiB GPU as they are
    ("0.5B", "lora", 16384, 24, 0, 1, True, False),  # ... not a 24 GiB one (the 16k x 152k logits alone: 32 GiB)
    ("0.5B", "lora", 4096, 24, 0, 1, False, True),
    ("0.5B", "full", 4096, 80, 0, 1, False, True),
    ("0.5B", "full", 4096, 24, 0, 1, True, True),  # only with it
    ("7B", "lora", 2048, 80, 0, 1, False, True),
    ("7B", "lora", 16384, 80, 0, 1, True, True),  # the paper's 7B LoRA at 16k tokens on an H100: only with it
    ("7B", "lora", 16384, 24, 0, 1, True, False),
    ("7B", "full", 2048, 80, 0, 1, True, False),  # 122 GB of fp32 weights and Adam states: no device holds them
    ("7B", "full", 4096, 80, 3, 8, False, True),  # ZeRO-3 over 8 ranks: fits as it is
    ("7B", "full", 16384, 80, 3, 16, True, True),
])
def test_auto_checkpoints_exactly_when_the_step_would_not_fit(model, mode, tokens, gib, zero, ranks, enabled, fits):
    shape = SHAPES[(model, mode)]
    d = decide("auto", shape, tokens, mode, "bf16", gib * GiB, zero, ranks)
    assert d.enabled is enabled, d
    assert d.checkpointed_gib < d.estimate_gib  # it always saves memory
    assert (d.estimate_gib <= d.budget_gib) is not enabled
    assert (d.checkpointed_gib <= d.budget_gib) is fits, d
    assert ("does not fit even with it" in d.reason) is not fits


def test_the_estimate_grows_with_tokens_and_shrinks_with_zero():
    shape = SHAPES[("7B", "full")]
    a, b = (estimate(shape, t, "full", "bf16", False).total for t in (1024, 2048))
    assert b > a
    plain, z1, z2, z3 = (estimate(shape, 1024, "full", "bf16", False, s, 8).weights for s in (0, 1, 2, 3))
    assert plain == shape.params * 18 and plain > z1 > z2 > z3  # fp32 weight, gradient, 2 moments + bf16 copy
    lora = SHAPES[("7B", "lora")]
    assert estimate(lora, 1024, "lora", "bf16", False).weights == pytest.approx(
        (lora.params - lora.trainable) * 2 + lora.trainable * 16)


def test_forced_settings_and_the_cpu():
    shape = SHAPES[("7B", "lora")]
    assert decide("true", shape, 16, "lora", "bf16", 80 * GiB).enabled is True
    assert decide("false", shape, 10**6, "lora", "bf16", 80 * GiB).enabled is False
    assert decide("auto", shape, 10**6, "lora", "fp32", None).enabled is False  # the CPU: never under auto
    with pytest.raises(ValueError, match="gradientCheckpointing"):
        decide("on", shape, 16, "lora", "bf16", 80 * GiB)


def test_zero_stage_is_read_from_the_deepspeed_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert zero_stage(str(path)) == 3
    assert zero_stage(None) == 0 and zero_stage(str(tmp_path / "missing.json")) == 0  # unknown: counted unsplit
    path.write_text("{not json")
    assert zero_stage(str(path)) == 0


def test_config_setting_defaults_to_auto_and_reads_yaml_booleans():
    assert RunConfig.model_validate({"name": "x"}).training.gradient_checkpointing == "auto"
    for value, setting in ((True, "true"), (False, "false"), ("auto", "auto"), ("true", "true")):
        cfg = parse_config({"name": "x", "training": {"gradientCheckpointing": value}})
        assert cfg.training.gradient_checkpointing == setting
    with pytest.raises(Exception, match="gradientCheckpointing"):
        parse_config({"name": "x", "training": {"gradientCheckpointing": "sometimes"}})


# -- the coefficients, measured -------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


def _model(mode: str, precision: str, checkpointing: bool, layers: int, vocab: int, **dims):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=1024,
                         attn_implementation="sdpa", **dims)
    model = Qwen2ForCausalLM(config)
    if mode == "lora":  # as the trainer loads it: frozen bf16 base weights under bf16, fp32 adapters
        model = get_peft_model(model.to(torch.bfloat16) if precision == "bf16" else model,
                               LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _saved_bytes(model, tokens: int, vocab: int, precision: str) -> int:
    """Bytes autograd keeps for the backward of one forward with a loss, the parameters apart."""
    from saved_tensors import saved_bytes

    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with amp:
        return saved_bytes(model, lambda: model(input_ids=ids, labels=ids))


def _per_token(mode, precision, checkpointing, layers, vocab, **dims) -> float:
    """Saved bytes per token (the difference of two lengths: what does not grow with tokens, such as autocast's
    weight copies, cancels)."""
    model = _model(mode, precision, checkpointing, layers, vocab, **dims)
    return (_saved_bytes(model, 128, vocab, precision) - _saved_bytes(model, 64, vocab, precision)) / 64


# A shape none of the coefficients were fitted on: 6 heads of 64, 2 key/value heads, a 3x MLP.
DIMS = dict(hidden_size=384, intermediate_size=1152, num_attention_heads=6, num_key_value_heads=2)


@pytest.mark.parametrize(("mode", "precision"), sorted(ACTIVATION_BYTES))
def test_activation_coefficients_match_what_autograd_saves(mode, precision):
    shape = ModelShape(params=0, trainable=0, layers=1, hidden=384, intermediate=1152, kv=128, vocab=512,
                       lora_rank=8 if mode == "lora" else 0)
    one, two = (_per_token(mode, precision, False, n, 512, **DIMS) for n in (1, 2))
    assert two - one == pytest.approx(layer_bytes_per_token(shape, mode, precision), rel=0.03)
    one_ck, two_ck = (_per_token(mode, precision, True, n, 512, **DIMS) for n in (1, 2))
    assert two_ck - one_ck == pytest.approx(layer_input_bytes(mode, precision) * 384, rel=0.03)
    big_vocab = _per_token(mode, precision, False, 1, 4608, **DIMS)
    assert (big_vocab - one) / 4096 == pytest.approx(LOSS_SAVED, rel=0.03)  # the fp32 log-softmax per entry


def test_model_shape_of_a_peft_model():
    model = _model("lora", "fp32", False, 2, 512, **DIMS)
    shape = ModelShape.of(model)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.kv, shape.vocab, shape.lora_rank) == (
        2, 384, 1152, 128, 512, 8)
    assert 0 < shape.trainable < shape.params == sum(p.numel() for p in model.parameters())
