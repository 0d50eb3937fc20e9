"""The trainer's callbacks: a log line and the metrics per logged step, each saved checkpoint uploaded to the store."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .layout import checkpoint_prefix
from .store import Store
from .trained_models import stored_checkpoints
from .treestore import delete_tree, upload_tree

log = logging.getLogger("selflengthen.train")


def callback_classes():
    """StepLog and StoreCheckpoints (classes made on first use: transformers is imported only to train)."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """Per logging step: loss, learning rate, grad norm, tokens/s and samples/s (over the logging interval)."""

        def __init__(self, history: list[dict], tick=None, observe=None):
            self.history = history
            self.tick = tick
            self.observe = observe
            self._last = None

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            if self.tick and state.is_world_process_zero:
                self.tick(state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs or self._last is None:
                return
            now = time.perf_counter()
            t0, step0, tokens0 = self._last
            dt = max(now - t0, 1e-9)
            steps = state.global_step - step0
            samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            entry = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs["loss"],
                "learningRate": logs.get("learning_rate"),
                "gradNorm": logs.get("grad_norm"),
                "tokensPerSecond": round((state.num_input_tokens_seen - tokens0) / dt, 1),
                "samplesPerSecond": round(samples / dt, 3),
                "tokensSeen": state.num_input_tokens_seen,
                "time": time.time(),
            }
            self._last = (now, state.global_step, state.num_input_tokens_seen)
            if state.is_world_process_zero:
                self.history.append(entry)
                if self.observe:
                    self.observe(entry, state.max_steps)
                log.info("step %d/%d loss %.4f lr %.3g %.0f tok/s %.2f samples/s", state.global_step,
                         state.max_steps, entry["loss"], entry["learningRate"] or 0.0, entry["tokensPerSecond"],
                         entry["samplesPerSecond"])

    class StoreCheckpoints(TrainerCallback):
        """Uploads each saved checkpoint to the store (rank 0, after every rank has written its part), keeps the
        newest `keep` there, and skips the Trainer's own end-of-training checkpoint (the final model follows)."""

        def __init__(self, store: Store, run: str, iteration: int, role: str, keep: int, dist, on_upload=None):
            self.store, self.run, self.iteration, self.role = store, run, iteration, role
            self.keep, self.dist, self.on_upload = keep, dist, on_upload

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False
            return control

        def on_save(self, args, state, control, **kwargs):
            self.dist.wait_for_everyone()  # every rank has written its files (RNG states, optimizer shards)
            if state.is_world_process_zero:
                local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                prefix = checkpoint_prefix(self.run, self.iteration, self.role, state.global_step)
                started = time.perf_counter()
                upload_tree(self.store, local, prefix, meta={"step": state.global_step})
                log.info("checkpoint %d uploaded to %s/%s in %.1fs", state.global_step, self.store.uri, prefix,
                         time.perf_counter() - started)
                steps = stored_checkpoints(self.store, self.run, self.iteration, self.role)
                for old in steps[: max(0, len(steps) - self.keep)]:
                    delete_tree(self.store, checkpoint_prefix(self.run, self.iteration, self.role, old))
                if self.on_upload:
                    self.on_upload()
            return control

    return StepLog, StoreCheckpoints


def metrics_observer(ctx, role: str):
    """Feeds the training series of the Prometheus metrics from each logged step."""
    m = getattr(ctx, "metrics", None)
    if m is None:
        return None
    labels = {"run": ctx.config.name, "iteration": str(ctx.iteration), "role": role}

    def observe(entry: dict, max_steps: int) -> None:
        m.train_step.labels(**labels).set(entry["step"])
        m.train_steps.labels(**labels).set(max_steps)
        m.train_loss.labels(**labels).set(entry["loss"])
        m.train_lr.labels(**labels).set(entry["learningRate"] or 0.0)
        m.train_tokens_rate.labels(**labels).set(entry["tokensPerSecond"])
        m.train_samples_rate.labels(**labels).set(entry["samplesPerSecond"])
        m.train_epoch.labels(**labels).set(entry["epoch"])

    return observe
