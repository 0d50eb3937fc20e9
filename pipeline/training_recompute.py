"""What the trainer recomputes in the backward to save memory, and only where memory needs it.

train_memory.Decision.plan_for(tokens) says, for a batch of that many tokens (batch x its longest example), the
cheapest recompute with which it fits the device; a forward pre-hook on the model applies it before every forward.
A short batch recomputes nothing (4N FLOPs per token), the longest the most, instead of every batch paying what the
longest one needs.

* Checkpointed decoder layers: transformers' per-layer `gradient_checkpointing` flag, set for the first k layers.
* The loss in chunks (training.lossChunkTokens): the causal LM's forward computes the output projection and the
  cross-entropy over `chunk` positions at a time under activation checkpointing, so no batch holds more than one
  chunk's logits (16k positions x a 152k vocabulary are 32 GiB in the usual float32 loss); the chunk's logits are
  recomputed in the backward (2 h V FLOPs per token, a few per cent of a 7B step). The loss and its gradients are
  those of the model's own loss (the same normalisation: by num_items_in_batch when the Trainer gives it, else the
  mean over the labelled positions), up to float summation order.

Both are exact: non-reentrant checkpointing replays the RNG state, so the weights a run ends with do not depend on
either (test_training_recompute.py).
"""

from __future__ import annotations

import logging
import types
from collections import Counter

log = logging.getLogger("selflengthen.train")
IGNORE_INDEX = -100


def decoder_layers(model) -> list:
    """The model's checkpointable decoder layers, in order (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


class Recompute:
    """What each training forward recomputes (see the module's docstring), as decision.plan_for(tokens) says for
    its batch (tokens = batch x its longest example); `counts` tallies the forwards by plan, for the manifest."""

    def __init__(self, model, decision):
        self.decision = decision
        self.layers = decoder_layers(model)
        self.counts: Counter[tuple[int, int]] = Counter()
        self.chunk = 0  # the current forward's loss chunk (0: the model's own loss)
        self.handle = None
        self.chunked = False
        if not decision.enabled:
            return
        if self.layers and (decision.layers or 0) > 0:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if decision.loss_chunk > 0:
            self.chunked = use_chunked_loss(model, lambda: self.chunk)
        self.handle = model.register_forward_pre_hook(self.before_forward, with_kwargs=True)

    @property
    def per_layer(self) -> bool:
        """False when the model has no per-layer switch: then the Trainer's all-or-nothing setting applies."""
        return bool(self.layers)

    def before_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        tokens = int(ids.shape[0] * ids.shape[1]) if ids is not None and ids.dim() >= 2 else 0
        k, chunk = self.decision.plan_for(tokens) if module.training else (0, 0)
        self.chunk = chunk if self.chunked else 0
        for i, layer in enumerate(self.layers):
            layer.gradient_checkpointing = i < k
        if module.training:
            self.counts[(k if self.layers else 0, self.chunk)] += 1
        return None

    def summary(self) -> dict:
        """Training forwards by checkpointed layers, and how many computed the loss in chunks, e.g.
        {"byLayers": {"0": 812, "16": 40}, "chunkedLoss": 40}: how much recompute the run paid."""
        by_layers: Counter[int] = Counter()
        for (k, _), n in self.counts.items():
            by_layers[k] += n
        return {"byLayers": {str(k): n for k, n in sorted(by_layers.items())},
                "chunkedLoss": sum(n for (_, chunk), n in self.counts.items() if chunk)}


def chunked_loss(head, hidden, labels, chunk: int, num_items_in_batch=None):
    """The causal-LM loss of `hidden` through the output projection `head` against `labels` (shifted here, as
    transformers' ForCausalLMLoss does), `chunk` positions at a time under checkpointing."""
    import torch
    from torch.nn import functional as F
    from torch.utils.checkpoint import checkpoint

    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]

    def piece(h, y):
        logits = head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1).to(logits.device),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    total = None
    for start in range(0, hidden.shape[1], chunk):
        part = checkpoint(piece, hidden[:, start:start + chunk], shifted[:, start:start + chunk],
                          use_reentrant=False)
        total = part if total is None else total + part
    if num_items_in_batch is not None:
        divisor = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    else:
        divisor = (shifted != IGNORE_INDEX).sum().clamp(min=1).to(total.device)
    return total / divisor


def causal_lm(model):
    """The causal LM under a peft wrapper (its forward is the one that computes the loss)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_chunked_loss(model, chunk) -> bool:
    """Make the causal LM's training forward compute its loss in chunks of `chunk` positions (an int, or a
    callable read at every forward: 0 then means the model's own loss); False (and the model's own loss) for a
    model without the usual decoder + lm_head layout, or when chunk is 0."""
    chunk_of = chunk if callable(chunk) else (lambda: chunk)
    lm = causal_lm(model)
    decoder, head = getattr(lm, "model", None), getattr(lm, "lm_head", None)
    if (not callable(chunk) and chunk <= 0) or decoder is None or head is None:
        if callable(chunk) or chunk > 0:
            log.info("training.lossChunkTokens: %s has no decoder + lm_head to chunk the loss over; its own loss",
                     type(lm).__name__)
        return False
    own = lm.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        size = chunk_of()
        if labels is None or not self.training or size <= 0:
            return own(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                       use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("return_dict", None)  # always a ModelOutput here (the Trainer reads outputs["loss"])
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        loss = chunked_loss(self.lm_head, outputs.last_hidden_state, labels, size,
                            kwargs.get("num_items_in_batch"))
        # no logits: holding them is what the chunks avoid (the Trainer's training step reads only the loss)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values)

    lm.forward = types.MethodType(forward, lm)
    return True
