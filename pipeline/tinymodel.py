"""A tiny Qwen2-architecture chat model built on this machine, for the local run and the tests.

Nothing is downloaded: a byte-level BPE tokenizer is trained on the packaged seed instructions and LonGen
queries, given a ChatML chat template, and a few-layer Qwen2ForCausalLM is trained for a few seconds on chat
turns made from that text (including the pipeline's own prompt formats) so that its output has words,
sentences, paragraphs and end-of-turn tokens. It writes long, meaningless text; that is enough to exercise
every stage for real. The result is cached by its build parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from . import prompts
from .data import load_longen, load_seed_instructions

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if not (loop.last and message['role'] == 'assistant' and continue_final_message is defined "
    "and continue_final_message) %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_URI = "tiny://qwen2"


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4  # head_dim 32: vLLM's CPU attention needs >= 32
    kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 4096
    max_train_tokens: int = 384
    train_steps: int = 400
    seed: int = 0
    version: int = 2  # bump when the corpus or the recipe changes

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("SELFLENGTHEN_CACHE", Path.home() / ".cache" / "selflengthen"))


def _texts() -> list[str]:
    texts = [row["prompt"] for lang in ("en", "zh") for row in load_seed_instructions(lang)]
    texts += [row["query"] for row in load_longen()]
    return texts


def _answer(rng: random.Random, texts: list[str], paragraphs: int) -> str:
    return "\n\n".join(rng.choice(texts) for _ in range(paragraphs))


def _conversations(rng: random.Random, texts: list[str], n: int) -> list[list[dict]]:
    """Chat turns in the shapes the pipeline asks for: answers, longer rewrites, instruction lists, judgements."""
    convs = []
    for _ in range(n):
        kind = rng.random()
        instruction = rng.choice(texts)
        lang = "zh" if any("\u4e00" <= c <= "\u9fff" for c in instruction) else "en"
        if kind < 0.45:
            convs.append([{"role": "user", "content": instruction},
                          {"role": "assistant", "content": _answer(rng, texts, rng.randint(2, 4))}])
        elif kind < 0.75:
            answer = _answer(rng, texts, rng.randint(1, 2))
            user = prompts.render(lang, "extend", instruction=instruction, response=answer)
            longer = answer + "\n\n" + _answer(rng, texts, rng.randint(2, 3))
            convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": longer}])
        elif kind < 0.9:
            examples = rng.sample(texts, 3)
            messages = prompts.self_instruct_messages(lang, examples[:2])
            messages[-1]["content"] += " " + examples[2]
            convs.append(messages)
        else:
            user = prompts.render(lang, "judge", instruction=instruction)
            answer = "yes" if lang == "en" else "是"
            convs.append([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    return convs


def build_tiny_model(out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    texts = _texts()

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(  # no bars of its own: the runner shows one line for the whole build
        vocab_size=spec.vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts * 2, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,  # noqa: S106 - tokens
        model_max_length=spec.max_positions,
    )
    tokenizer.chat_template = CHATML

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    model = Qwen2ForCausalLM(config)

    # Some seconds of next-token training on the assistant turns of the conversations (the prompts are long and
    # fixed: learning them would only teach the model to echo them), so that generations have structure.
    convs = _conversations(rng, texts, 800)
    encoded = []
    for conv in convs:
        ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(conv[:-1], tokenize=True, return_dict=False, add_generation_prompt=True)
        encoded.append((ids[: spec.max_train_tokens], len(prompt)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / spec.train_steps)
    model.train()
    for step in range(spec.train_steps):
        batch = [encoded[(step * 8 + i) % len(encoded)] for i in range(8)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), config.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, (row, start) in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, start : len(row)] = ids[i, start : len(row)]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()

    return save_checkpoint(out_dir, model, tokenizer, "tiny_spec.json",
                           {**asdict(spec), "final_loss": float(loss.detach())})


def save_checkpoint(out_dir: Path, model, tokenizer, info_name: str, info: dict) -> Path:
    """Write a cached Hugging Face checkpoint (safetensors, tokenizer, `info_name` with `info`) atomically: it is
    built in a sibling temporary directory and renamed, so a cached model is always whole; a concurrent build that
    finished first wins."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / info_name).write_text(json.dumps(info, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache directory is readable like any other
        try:
            tmp.replace(out_dir)
        except OSError:
            if not (out_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_model_path(spec: TinySpec = TinySpec(), root: Path | None = None) -> Path:
    return (root or cache_root() / "models") / f"tiny-qwen2-{spec.key()}"


def tiny_model_cached(spec: TinySpec = TinySpec(), root: Path | None = None) -> bool:
    return (tiny_model_path(spec, root) / "config.json").exists()


def ensure_tiny_model(spec: TinySpec = TinySpec(), root: Path | None = None) -> Path:
    """The cached tiny model directory, built on first use."""
    path = tiny_model_path(spec, root)
    root = path.parent
    if not (path / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        build_tiny_model(path, spec)
    return path
