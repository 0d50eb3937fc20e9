"""SFT data of one iteration, made from the extend stage's outputs (docs/method.md: build-sft).

  generator set: the instruction -> the extended response;
  extender set:  the extend prompt over the initial response, each of its lines dropped with probability
                 buildSft.lineDropProbability (seeded per item) -> the extended response.

Rows are chat conversations ({"id", "language", "messages": [user, assistant]}), so the trainer renders them with
the tokenizer's own chat template. Layout: <run>/iter-NN/build-sft/{generator,extender}/part-*.jsonl, one
manifest.json (counts and average words per set) and _SUCCESS last.
"""

from __future__ import annotations

import random

from .. import prompts
from ..artifacts import StageArtifacts
from ..text import count_words
from . import StageContext, StageError
from .common import average

NAME = "build-sft"
REQUIRES = ("extend",)
SETS = ("generator", "extender")


def sft_artifacts(ctx: StageContext, role: str, iteration: int | None = None) -> StageArtifacts:
    """Where the SFT set of a role (generator or extender) lives."""
    if role not in SETS:
        raise ValueError(f"role {role!r}: one of {', '.join(SETS)} wanted")
    return ctx.artifacts(f"{NAME}/{role}", iteration)


def drop_lines(text: str, probability: float, rng: random.Random) -> tuple[str, int, int]:
    """Drop each non-blank line with the given probability (one draw per non-blank line, in order); runs of
    blank lines left behind collapse into one. At least one line always stays. Returns (text, lines, dropped)."""
    lines = text.strip().split("\n")
    kept: list[str] = []
    total = dropped = 0
    for line in lines:
        if not line.strip():
            if kept and kept[-1].strip():
                kept.append("")
            continue
        total += 1
        if rng.random() < probability:
            dropped += 1
        else:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    if not kept and total:
        first = next(line for line in lines if line.strip())
        return first, total, total - 1
    return "\n".join(kept), total, dropped


def generator_example(row: dict) -> dict:
    return {
        "id": row["id"],
        "language": row["language"],
        "messages": [{"role": "user", "content": row["instruction"]},
                     {"role": "assistant", "content": row["extended"]}],
    }


def extender_example(row: dict, probability: float, seed: int) -> tuple[dict, int, int]:
    shortened, lines, dropped = drop_lines(row["initial"], probability, random.Random(seed))
    user = prompts.render(row["language"], "extend", instruction=row["instruction"], response=shortened)
    example = {
        "id": row["id"],
        "language": row["language"],
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["extended"]}],
        "inputWords": count_words(shortened),
    }
    return example, lines, dropped


def run(ctx: StageContext) -> dict:
    upstream = ctx.artifacts("extend")
    shard_size = ctx.config.storage.shard_size
    probability = ctx.config.build_sft.line_drop_probability

    stats = {"generator": [], "extender": [], "extenderInput": [], "lines": 0, "dropped": 0}

    def generator_rows():
        for row in upstream.read_outputs():
            stats["generator"].append(count_words(row["extended"]))
            yield generator_example(row)

    def extender_rows():
        for row in upstream.read_outputs():
            example, lines, dropped = extender_example(row, probability, ctx.seed(NAME, "drop-lines", row["id"]))
            stats["lines"] += lines
            stats["dropped"] += dropped
            stats["extender"].append(count_words(row["extended"]))
            stats["extenderInput"].append(example["inputWords"])
            yield example

    generator = sft_artifacts(ctx, "generator").write_outputs(generator_rows(), shard_size)
    extender = sft_artifacts(ctx, "extender").write_outputs(extender_rows(), shard_size)
    if generator != extender:  # the extend outputs changed between the two passes
        raise StageError(f"stage {NAME}: extend outputs changed while reading them ({generator} != {extender} rows)")
    if generator == 0:
        raise StageError(nothing_to_train(ctx))
    return {
        "counts": {"requested": generator, "accepted": generator, "generator": generator, "extender": extender},
        "sets": {role: f"{sft_artifacts(ctx, role).prefix}/" for role in SETS},
        "averageWords": {
            "generator": average(stats["generator"]),
            "extender": average(stats["extender"]),
            "extenderInput": average(stats["extenderInput"]),
        },
        "lineDropProbability": probability,
        "lines": stats["lines"],
        "linesDropped": stats["dropped"],
    }


def nothing_to_train(ctx: StageContext) -> str:
    """Why the iteration has no SFT data, from the respond and extend manifests, and what to change."""
    stages = {stage: ctx.artifacts(stage) for stage in ("respond", "extend")}
    counts = {stage: a.manifest().get("counts") or {} for stage, a in stages.items() if a.done()}
    why = "; ".join(
        f"{stage} kept {c.get('accepted', 0)} of {c.get('requested', 0)}"
        + (f" (tries rejected: {', '.join(f'{r} {n}' for r, n in sorted(c['rejected'].items()))})"
           if c.get("rejected") else "")
        for stage, c in counts.items())
    return (f"stage {NAME} of iteration {ctx.iteration}: the extend stage accepted no responses, so there is nothing "
            f"to train on: {why}. Tries rejected as 'ending' ran into their token cap (raise respond.maxTokens or "
            f"extend.maxTokens); 'growth' or 'no-growth' did not grow by extend.minGrowth (lower it, or raise "
            f"extend.maxRetries); then `selflengthen run FILE --restart-from respond` redoes the stages from there")
