"""How many decoder layers a training step checkpoints (training.gradientCheckpointing: auto), from an estimate of
its peak memory on one device.

Checkpointing a decoder layer recomputes its forward during the backward: 6N instead of 4N FLOPs per token (N
parameters) when every layer does, a third more compute, for the memory of the layers' saved activations. `auto`
checkpoints the fewest layers with which the batch at hand fits the device, batch by batch (a short batch none; the
longest the paper's cutoff allows, most of them), so the recompute is paid only where memory needs it.

The estimate, in bytes, for one device, a batch of T = batchSize x (longest example) tokens:

    weights + optimizer      LoRA: (P - p) x w  +  p x 16       full: P x 16  (+ P x 2: bf16 autocast copies)
                             P parameters, p trainable, w bytes of the frozen weights (2 bf16, 4 fp32); 16 =
                             fp32 weight + gradient + Adam's two moments. Under DeepSpeed ZeRO stage s (read from
                             training.deepspeed) the moments (s >= 1), the gradients (s >= 2) and the weights
                             with their copies (s = 3) are divided by the number of ranks.
    activations, saved       T x (L - k) x (c_h h + c_kv kv + c_i I + c_r r)  +  T x k x b h  (+ one layer's term
                             when k > 0)   with k of the L layers checkpointed: each of those keeps its input (b = 2
                             for LoRA in bf16, else 4), and the layer being recomputed holds its own at the peak
    loss                     R x V x (a + 4 + 4 + 4)   the logits (a = 2 bytes each in bf16, 4 in fp32), their fp32
                             copy, the saved log-softmax and its gradient at the start of the backward, for R = T
                             rows, or R = the chunk under training.lossChunkTokens (training_loss.py: the logits of
                             one chunk at a time, recomputed in the backward)

h hidden size, kv = key/value heads x head size, I the MLP's intermediate size, r the LoRA rank, L layers, V the
vocabulary. The per-layer coefficients (bytes per token, `ACTIVATION_BYTES`) were measured with autograd's
saved-tensor hooks on Qwen2 models (transformers' SDPA attention; LoRA on all linear layers with dropout 0: a LoRA
dropout adds a copy of each adapted input, left out) and are re-measured by tests/test_train_memory.py. The step
fits when the estimate is at most `USABLE` of the device's memory less `RESERVED` (CUDA context, NCCL buffers);
the estimate leaves out the allocator's caching and fragmentation, and `USABLE` is the margin for them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
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


def saved_activation_bytes(shape: ModelShape, tokens: int, mode: str, precision: str, checkpointed: int) -> float:
    """What autograd keeps for the backward over the decoder layers (the loss apart), `checkpointed` of them
    recomputing their forward."""
    per_layer = layer_bytes_per_token(shape, mode, precision)
    k = max(0, min(int(checkpointed), shape.layers))
    kept = layer_input_bytes(mode, precision) * shape.hidden
    return tokens * ((shape.layers - k) * per_layer + k * kept + (per_layer if k else 0))


def loss_bytes(shape: ModelShape, tokens: int, precision: str, loss_chunk: int = 0) -> float:
    """The loss's peak: the logits of every row, or of one chunk of `loss_chunk` rows (training_loss.py)."""
    act = 2 if precision == "bf16" else 4
    rows = min(tokens, loss_chunk) if loss_chunk > 0 else tokens
    return rows * shape.vocab * (act + 4 + LOSS_SAVED + 4)


def estimate(shape: ModelShape, tokens: int, mode: str, precision: str, checkpointed: int,
             zero_stage: int = 0, world_size: int = 1, loss_chunk: int = 0) -> Estimate:
    """Peak bytes of one training step on one device, `checkpointed` decoder layers recomputing (see the
    module's docstring)."""
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
    return Estimate(weights=weights,
                    activations=saved_activation_bytes(shape, tokens, mode, precision, checkpointed),
                    loss=loss_bytes(shape, tokens, precision, loss_chunk))


def recompute_share(shape: ModelShape, checkpointed: int, loss_chunk: bool = False) -> float:
    """A step's FLOPs over the plain 4N of one without recompute: each checkpointed layer adds its forward again
    (2 x its parameters), a chunked loss the output projection's (2 h V: its logits are recomputed)."""
    per_layer = max(0, shape.params - 2 * shape.hidden * shape.vocab) / max(1, shape.layers)
    extra = 2 * per_layer * max(0, min(checkpointed, shape.layers)) + (2 * shape.hidden * shape.vocab
                                                                        if loss_chunk else 0)
    return (4 * shape.params + extra) / (4 * shape.params)


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
class Fit:
    """What a batch's memory is weighed against: the model, how it trains and the device's budget."""

    shape: ModelShape
    mode: str
    precision: str
    room: float
    zero: int = 0
    world_size: int = 1
    loss_chunk: int = 0  # training.lossChunkTokens: the chunk a batch may compute its loss in (0: never)

    def total(self, tokens: int, checkpointed: int, loss_chunk: int | None = None) -> float:
        chunk = self.loss_chunk if loss_chunk is None else loss_chunk
        return estimate(self.shape, tokens, self.mode, self.precision, checkpointed, self.zero, self.world_size,
                        chunk).total

    def fewest_layers(self, tokens: int, loss_chunk: int | None = None) -> int | None:
        """The fewest checkpointed layers with which a batch of `tokens` fits; None when not even all do. (One
        layer is never the answer: it costs its recompute peak and saves less than that.)"""
        return next((k for k in range(self.shape.layers + 1) if self.total(tokens, k, loss_chunk) <= self.room),
                    None)

    @functools.lru_cache(maxsize=4096)  # noqa: B019 -- a few hundred batch sizes a run, Fit is immutable
    def plan(self, tokens: int) -> tuple[int, int]:
        """(checkpointed layers, loss chunk or 0) for a batch of `tokens`: of the ways that fit (the whole-batch
        loss, or the chunked one), the one that recomputes the fewest FLOPs; everything when none fits."""
        options = [(k, chunk) for chunk in dict.fromkeys((0, self.loss_chunk))
                   if (k := self.fewest_layers(tokens, chunk)) is not None]
        if not options:
            return self.shape.layers, self.loss_chunk
        return min(options, key=lambda o: (recompute_share(self.shape, o[0], o[1] > 0), o[1]))


@dataclass(frozen=True)
class Decision:
    enabled: bool  # some batch recomputes (the longest one does)
    reason: str
    estimate_gib: float | None = None  # the longest batch without recompute
    checkpointed_gib: float | None = None  # ... with every layer checkpointed (and the loss chunked)
    budget_gib: float | None = None
    layers: int | None = None  # layers the longest batch checkpoints
    of_layers: int | None = None
    loss_chunk: int = 0  # the loss chunk of the longest batch (0: whole-batch logits)
    fit: Fit | None = dataclasses.field(default=None, repr=False, compare=False)

    def plan_for(self, tokens: int) -> tuple[int, int]:
        """(checkpointed layers, loss chunk or 0) for a batch of `tokens`: true everything, false nothing, auto
        the cheapest recompute that fits (Fit.plan)."""
        if self.fit is None:
            return ((self.of_layers or 0), self.loss_chunk) if self.enabled else (0, 0)
        return self.fit.plan(tokens)

    def layers_for(self, tokens: int) -> int:
        return self.plan_for(tokens)[0]

    def summary(self) -> dict:
        """For the stage manifest (GiB to two decimals)."""
        names = {"estimate_gib": "estimateGiB", "checkpointed_gib": "checkpointedGiB", "budget_gib": "budgetGiB",
                 "of_layers": "ofLayers", "loss_chunk": "lossChunk"}
        return {names.get(f.name, f.name): (round(v, 2) if isinstance(v, float) else v)
                for f in dataclasses.fields(self) if f.name != "fit" for v in (getattr(self, f.name),)}


def decide(setting: str, shape: ModelShape | None, tokens: int, mode: str, precision: str,
           device_bytes: int | None, zero: int = 0, world_size: int = 1, loss_chunk: int = 0) -> Decision:
    """What the longest batch (`tokens`) recomputes, and through Decision.plan_for every other batch: the
    checkpointed decoder layers and whether the loss goes in chunks of `loss_chunk` positions. setting
    "true"/"false" decide alone (every layer and the chunked loss, or neither); "auto" recomputes on an
    accelerator (device_bytes known) the least that lets a batch fit the budget, and nothing on the CPU (host
    memory is not the limit this trades against: the step runs at half the FLOPs without it)."""
    layers = shape.layers if shape is not None else None
    if setting in ("true", "false"):
        on = setting == "true"
        return Decision(on, f"training.gradientCheckpointing {setting}",
                        layers=(layers if on else 0) if layers is not None else None, of_layers=layers,
                        loss_chunk=loss_chunk if on else 0)
    if setting != "auto":
        raise ValueError(f"training.gradientCheckpointing {setting!r}: auto, true or false wanted")
    if device_bytes is None or shape is None:
        return Decision(False, "auto on the CPU: off", layers=0 if layers is not None else None, of_layers=layers)
    fit = Fit(shape, mode, precision, budget(device_bytes), zero, world_size, loss_chunk)
    k, chunk = fit.plan(tokens)
    gib = dict(estimate_gib=fit.total(tokens, 0, 0) / GiB, checkpointed_gib=fit.total(tokens, shape.layers) / GiB,
               budget_gib=fit.room / GiB, of_layers=shape.layers, layers=k, loss_chunk=chunk, fit=fit)
    how = " and ".join(([f"{k} of {shape.layers} layers checkpointed"] if k else [])
                       + ([f"the loss in chunks of {chunk}"] if chunk else []))
    if (k, chunk) == (0, 0):
        return Decision(False, "auto: the longest batch fits without recompute", **gib)
    if fit.total(tokens, k, chunk) > fit.room:
        return Decision(True, "auto: the longest batch does not fit even with it (expect out-of-memory; lower "
                              "training.cutoffTokens or batchSize, or use DeepSpeed ZeRO)", **gib)
    return Decision(True, f"auto: the longest batch fits only with {how} (shorter batches recompute less)", **gib)
