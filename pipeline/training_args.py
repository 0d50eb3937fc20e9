"""The trainer's settings of one training stage, from the run configuration: TRL's config-to-arguments idea (its
SFTConfig: one dataclass of trainer settings, with readable defaults, turned into transformers' TrainingArguments),
here a frozen dataclass made from `training.*` and the stage's seeds, and the precision resolved for the machine."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from .config import RunConfig, Training

log = logging.getLogger("selflengthen.train")


def precision(config: RunConfig) -> tuple[bool, str]:
    """(on CUDA, the precision trained in): training.precision resolved for this machine."""
    import torch

    cuda = torch.cuda.is_available()
    precision = config.training.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if precision == "bf16" and not cuda and not cpu_has_bf16():
        log.warning("training.precision bf16 on a CPU without bfloat16 instructions: training in float32")
        precision = "fp32"
    return cuda, precision


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 / AMX, through oneDNN): then an explicit
    training.precision bf16 is kept on the CPU too (auto stays float32 there)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass(frozen=True)
class TrainerSettings:
    """TrainingArguments' fields that a training stage sets (by their TrainingArguments names); the rest keep
    transformers' defaults. `of` maps the run configuration, `arguments` makes the TrainingArguments."""

    output_dir: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    num_train_epochs: float
    max_steps: int
    lr_scheduler_type: str
    warmup_steps: float  # a float below 1 is a ratio of the total steps
    weight_decay: float
    max_grad_norm: float
    logging_steps: int
    save_steps: int
    save_total_limit: int
    bf16: bool
    train_sampling_strategy: str
    seed: int
    data_seed: int
    use_cpu: bool
    ddp_timeout: int
    deepspeed: str | None
    # fixed: how a stage runs, whatever the configuration
    logging_strategy: str = "steps"
    save_strategy: str = "steps"
    gradient_checkpointing: bool = False  # decided once the model and the data are known (train_memory.py)
    gradient_checkpointing_kwargs: dict = dataclasses.field(default_factory=lambda: {"use_reentrant": False})
    include_num_input_tokens_seen: str = "non_padding"
    report_to: str = "none"
    disable_tqdm: bool = True
    dataloader_num_workers: int = 0
    remove_unused_columns: bool = False  # the examples are already ids and labels
    ddp_find_unused_parameters: bool = False

    @classmethod
    def of(cls, t: Training, *, output_dir: str, precision: str, cuda: bool, seed: int, data_seed: int
           ) -> TrainerSettings:
        return cls(
            output_dir=output_dir,
            per_device_train_batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            learning_rate=t.learning_rate,
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            lr_scheduler_type=t.scheduler,
            warmup_steps=t.warmup_ratio,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            logging_steps=t.logging_steps,
            save_steps=t.save_steps,
            save_total_limit=t.keep_checkpoints,
            bf16=precision == "bf16",
            train_sampling_strategy="group_by_length" if t.group_by_length else "random",
            seed=seed % 2**31,
            data_seed=data_seed % 2**31,
            use_cpu=not cuda,
            ddp_timeout=t.ddp_timeout_seconds,
            deepspeed=t.deepspeed,
        )

    def arguments(self):
        """transformers' TrainingArguments (making them joins the process group of a torchrun / accelerate
        launch, or makes a single process)."""
        from transformers import TrainingArguments

        return TrainingArguments(**dataclasses.asdict(self))
