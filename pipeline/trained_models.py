"""Trained models and checkpoints in the store, as the trainer and the servers read them: the newest checkpoints of
a role, and a local copy of a trained adapter (or full model) to serve."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .layout import CHECKPOINT, checkpoints_prefix, model_prefix
from .models import resolve_model
from .store import Store
from .training_data import TrainingError
from .treestore import download_tree, tree_complete, tree_manifest


def workdir_root() -> Path:
    return Path(os.environ.get("SELFLENGTHEN_WORKDIR", ".selflengthen"))


def stored_checkpoints(store: Store, run: str, iteration: int, role: str) -> list[int]:
    """Steps of the complete checkpoints in the store, ascending."""
    keys = store.list(checkpoints_prefix(run, iteration, role))
    return sorted(int(m.group(1)) for k in keys if (m := CHECKPOINT.search("/" + k)))


@dataclass(frozen=True)
class TrainedModel:
    path: Path  # local directory: a peft adapter (mode lora) or a whole model with its tokenizer (mode full)
    mode: str  # "lora" | "full"
    base: str  # the base model reference the adapter applies to (config models.base), resolved to a local path
    uri: str  # where it lives in the store


def fetch_trained_model(
    config: RunConfig, store: Store, iteration: int, role: str, workdir: Path | None = None
) -> TrainedModel:
    """A local copy of the model trained for `role` in `iteration` (downloaded once; reused while unchanged).
    For LoRA it is the adapter directory (serve with vLLM --enable-lora --lora-modules NAME=PATH over `base`);
    for full fine-tuning it is the whole model directory (serve it as the model)."""
    prefix = model_prefix(config.name, iteration, role)
    if not tree_complete(store, prefix):
        raise TrainingError(f"no trained {role} model for iteration {iteration} at {store.uri}/{prefix}")
    meta = tree_manifest(store, prefix)
    dest = (workdir or workdir_root()) / "models" / config.name / f"iter-{iteration:02d}" / role
    path = download_tree(store, prefix, dest)
    mode = meta.get("mode", "lora")
    base = resolve_model(config.models.base) if mode == "lora" else str(path)
    return TrainedModel(path=path, mode=mode, base=base, uri=f"{store.uri}/{prefix}")
