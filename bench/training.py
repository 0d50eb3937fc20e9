"""Training benchmark: a hook, pending. A colleague is building the train stage and its benchmark.

TODO(training): replace `run` with the real benchmark (issue 7): tokens/s of our train stage vs a plain
transformers Trainer baseline padding to the longest in batch, on the same variable-length SFT data (goal >= 1.5x
from packing / length grouping), the loss curves matching within noise; on a CUDA GPU also bf16 tokens/s and peak
memory for a 0.5B-class config. Keep the signature: run(quick: bool) -> list[Row].
"""

from __future__ import annotations

from .common import Row, pending

NOTE = "pending: the train stage's benchmark is being built (bench/training.py is the hook)"


def run(quick: bool = False) -> list[Row]:
    return [
        pending("training: SFT tokens/s, our train stage / Trainer padding to longest (goal >= 1.5)", NOTE),
        pending("training: loss curve, ours vs baseline (same within noise)", NOTE),
        pending("training (CUDA only): bf16 tokens/s and peak memory, 0.5B-class config", NOTE),
    ]
