"""Whether a training step needs gradient checkpointing (training.gradientCheckpointing: auto), from an estimate of
its peak memory on one device.

Checkpointing recomputes each decoder layer's forward during the backward: about 6N instead of 4N FLOPs per token
(N parameters), a third more compute, for the memory of the layers' saved activations. `auto` turns it on only
when the step would not fit the device without it.

The estimate, in bytes, for one device, a batch of T = batchSize x (longest example) tokens:

    weights + optimizer      LoRA: (P - p) x w  +  p x 16       full: P x 16  (+ P x 2: bf16 autocast copies)
                             P parameters, p trainable, w bytes of the frozen weights (2 bf16, 4 fp32); 16 =
                             fp32 weight + gradient + Adam's two moments. Under DeepSpeed ZeRO stage s (read from
                             training.deepspeed) the moments (s >= 1), the gradients (s >= 2) and the weights
                             with their copies (s = 3) are divided by the number of ranks.
    activations, saved       T x L x (c_h h + c_kv kv + c_i I + c_r r)   without checkpointing
                             T x L x b h  +  T x (one layer's term)     with it (each layer's input, b = 2 for
                             LoRA in bf16, else 4, and the layer being recomputed)
    loss                     T x V x (a + 4 + 4 + 4)   the logits (a = 2 bytes each in bf16, 4 in fp32), their fp32
                             copy, the saved log-softmax and its gradient at the start of the backward

h hidden size, kv = key/value heads x head size, I the MLP's intermediate size, r the LoRA rank, L layers, V the
vocabulary. The per-layer coefficients (bytes per token, `ACTIVATION_BYTES`) were measured with autograd's
saved-tensor hooks on Qwen2 models (transformers' SDPA attention; LoRA on all linear layers with dropout 0: a LoRA
dropout adds a copy of each adapted input, left out) and are re-measured by tests/test_train_memory.py. The step
fits when the estimate is at most `USABLE` of the device's memory less `RESERVED` (CUDA context, NCCL buffers);
the estimate leaves out the allocator's caching and fragmentation, and `USABLE` is the margin for them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

GiB = 2**30
USABLE = 0.85  # of the device's memory
RESERVED = 2 * GiB  # CUDA context, NCCL, fragmentation

# Saved activations per token per decoder layer, in bytes: (per hidden unit, per key/value unit, per intermediate
# unit, per LoRA rank unit), by (mode, precision) as the trainer runs them: bf16 is autocast (LoRA over bf16
# weights, full over fp32 master weights), fp32 is plain.
ACTIVATION_BYTES: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ("lora", "bf16"): (24, 4, 8, 17),
    ("lora", "fp32"): (24, 8, 16, 31),
    ("full", "bf16"): (30, 4, 8, 0),
    ("full", "fp32"): (32, 8, 16, 0),
}
LOSS_SAVED = 4  # bytes per token per vocabulary entry autograd keeps: the fp32 log-softmax


def layer_input_bytes(mode: str, precision: str) -> int:
    """What a checkpointed layer keeps per token per hidden unit: its input, in the residual stream's dtype (bf16
    for LoRA over bf16 weights; fp32 otherwise, autocast leaves the residual stream in the weights' fp32)."""
    return 2 if (mode, precision) == ("lora", "bf16") else 4


@dataclass(frozen=True)
class ModelShape:
    params: int  # all parameters (LoRA adapters included)
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    kv: int  # key/value heads x head size
    vocab: int
    lora_rank: int = 0

    @classmethod
    def of(cls, model) -> ModelShape:
        """The shape of a loaded (peft or plain) causal LM; sizes a config does not name fall back to a dense
        transformer's (intermediate 4h, as many key/value heads as query heads)."""
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        config = getattr(config, "text_config", None) or config
        hidden = int(config.hidden_size)
        heads = int(getattr(config, "num_attention_heads", 1) or 1)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        peft_config = getattr(model, "peft_config", {}).get("default")
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
            layers=int(config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
            kv=kv_heads * head_dim,
            vocab=int(config.vocab_size),
            lora_rank=int(peft_config.r) if peft_config is not None else 0,
        )


@dataclass(frozen=True)
class Estimate:
    weights: float  # weights, gradients and optimizer states
    activations: float
    loss: float

    @property
    def total(self) -> float:
        return self.weights + self.activations + self.loss


def layer_bytes_per_token(shape: ModelShape, mode: str, precision: str) -> float:
    c_h, c_kv, c_i, c_r = ACTIVATION_BYTES[(mode, precision)]
    return c_h * shape.hidden + c_kv * shape.kv + c_i * shape.intermediate + c_r * shape.lora_rank


def saved_activation_bytes(shape: ModelShape, tokens: int, mode: str, precision: str, checkpointing: bool) -> float:
    """What autograd keeps for the backward, over the decoder layers (the loss apart)."""
    per_layer = layer_bytes_per_token(shape, mode, precision)
    if not checkpointing:
        return tokens * shape.layers * per_layer
    return tokens * (shape.layers * layer_input_bytes(mode, precision) * shape.hidden + per_layer)


def estimate(shape: ModelShape, tokens: int, mode: str, precision: str, checkpointing: bool,
             zero_stage: int = 0, world_size: int = 1) -> Estimate:
    """Peak bytes of one training step on one device (see the module's docstring)."""
    parts = max(1, world_size)
    moments = 8 / (parts if zero_stage >= 1 else 1)
    grads = 4 / (parts if zero_stage >= 2 else 1)
    master = 4 / (parts if zero_stage >= 3 else 1)
    if mode == "lora":
        frozen = 2 if precision == "bf16" else 4
        weights = (shape.params - shape.trainable) * frozen + shape.trainable * (master + grads + moments)
    else:
        # bf16 autocast keeps a bf16 copy of every weight through the forward (of one gathered layer under ZeRO-3)
        copies = (2 if precision == "bf16" else 0) / (parts if zero_stage >= 3 else 1)
        weights = shape.params * (master + grads + moments + copies)
    act = 2 if precision == "bf16" else 4
    return Estimate(weights=weights,
                    activations=saved_activation_bytes(shape, tokens, mode, precision, checkpointing),
                    loss=tokens * shape.vocab * (act + 4 + LOSS_SAVED + 4))


def budget(device_bytes: int) -> float:
    return USABLE * device_bytes - RESERVED


def zero_stage(deepspeed: str | None) -> int:
    """The ZeRO stage of a DeepSpeed JSON config (0 without one, or when it cannot be read: the estimate then
    counts unpartitioned states, so `auto` errs towards checkpointing)."""
    if not deepspeed:
        return 0
    try:
        stage = json.loads(Path(deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)
        return int(stage) if stage in (0, 1, 2, 3) else 0
    except (OSError, ValueError, AttributeError):
        return 0


@dataclass(frozen=True)
class Decision:
    enabled: bool
    reason: str
    estimate_gib: float | None = None  # without checkpointing
    checkpointed_gib: float | None = None
    budget_gib: float | None = None

    def summary(self) -> dict:
        """For the stage manifest (GiB to two decimals)."""
        names = {"estimate_gib": "estimateGiB", "checkpointed_gib": "checkpointedGiB", "budget_gib": "budgetGiB"}
        return {names.get(k, k): (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def decide(setting: str, shape: ModelShape | None, tokens: int, mode: str, precision: str,
           device_bytes: int | None, zero: int = 0, world_size: int = 1) -> Decision:
    """Gradient checkpointing on or off. setting "true"/"false" decide alone; "auto" checkpoints on an accelerator
    (device_bytes known) when the step's estimate without it exceeds the budget, and never on the CPU (host memory
    is not the limit this trades against: the step runs at half the FLOPs without it)."""
    if setting in ("true", "false"):
        return Decision(setting == "true", f"training.gradientCheckpointing {setting}")
    if setting != "auto":
        raise ValueError(f"training.gradientCheckpointing {setting!r}: auto, true or false wanted")
    if device_bytes is None or shape is None:
        return Decision(False, "auto on the CPU: off")
    plain = estimate(shape, tokens, mode, precision, False, zero, world_size).total
    checkpointed = estimate(shape, tokens, mode, precision, True, zero, world_size).total
    room = budget(device_bytes)
    gib = dict(estimate_gib=plain / GiB, checkpointed_gib=checkpointed / GiB, budget_gib=room / GiB)
    if plain <= room:
        return Decision(False, "auto: the step fits without it", **gib)
    if checkpointed > room:
        return Decision(True, "auto: the step does not fit even with it (expect out-of-memory; lower "
                              "training.cutoffTokens or batchSize, or use DeepSpeed ZeRO)", **gib)
    return Decision(True, "auto: the step fits only with it", **gib)
