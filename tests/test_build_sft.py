"""build-sft: Generator and Extender SFT sets from the extend stage's outputs."""

import random

import pytest

from selflengthen.pipeline import prompts
from selflengthen.pipeline.config import RunConfig
from selflengthen.pipeline.stages import StageContext, StageError, run_stage
from selflengthen.pipeline.stages.build_sft import drop_lines, sft_artifacts
from selflengthen.pipeline.store import LocalStore


def extend_rows(n: int, lines: int = 10) -> list[dict]:
    rows = []
    for i in range(n):
        lang = "zh" if i % 5 == 4 else "en"
        initial = "\n".join(f"Line {j} of answer {i}, with some words." for j in range(lines))
        extended = initial + "\n\n" + "\n".join(f"More text {j} for answer {i}." for j in range(lines))
        rows.append({"id": f"r{i}-s0-a0", "responseId": f"r{i}-s0", "language": lang,
                     "instruction": f"Write a long essay number {i}.", "initial": initial, "extended": extended,
                     "initialWords": 0, "words": 0})
    return rows


def make_ctx(tmp_path, rows, **config) -> StageContext:
    store = LocalStore(tmp_path / "store")
    cfg = RunConfig.model_validate({"name": "sft", "storage": {"uri": f"file://{tmp_path}/store", "shardSize": 7},
                                    **config})
    ctx = StageContext(config=cfg, iteration=1, store=store)
    extend = ctx.artifacts("extend")
    extend.write_outputs(rows, 7)
    extend.finish({"counts": {"accepted": len(rows)}})
    return ctx


def test_drop_lines_is_seeded_and_drops_about_the_probability():
    text = "\n".join(f"line {i}" for i in range(20_000))
    a = drop_lines(text, 0.2, random.Random(1))
    b = drop_lines(text, 0.2, random.Random(1))
    c = drop_lines(text, 0.2, random.Random(2))
    assert a == b and a != c
    kept, lines, dropped = a
    assert lines == 20_000
    assert abs(dropped / lines - 0.2) < 0.01
    assert len(kept.split("\n")) == lines - dropped
    # the kept lines stay in order, unchanged
    kept_numbers = [int(line.split()[1]) for line in kept.split("\n")]
    assert kept_numbers == sorted(kept_numbers)


def test_drop_lines_edges():
    assert drop_lines("a\nb\nc", 0.0, random.Random(0)) == ("a\nb\nc", 3, 0)
    # everything dropped: the first line stays, so the prompt never loses the whole answer
    assert drop_lines("a\nb\nc", 0.999999, random.Random(0)) == ("a", 3, 2)
    # blank lines are not drawn for and do not pile up
    text, lines, _ = drop_lines("p1 l1\np1 l2\n\n\np2 l1\n\np3 l1", 0.0, random.Random(0))
    assert lines == 4 and text == "p1 l1\np1 l2\n\np2 l1\n\np3 l1"


def test_build_sft_stage(tmp_path):
    rows = extend_rows(30)
    ctx = make_ctx(tmp_path, rows)
    manifest = run_stage("build-sft", ctx)
    assert ctx.artifacts("build-sft").done()
    assert manifest["counts"]["generator"] == manifest["counts"]["extender"] == 30
    assert manifest["lines"] == 300
    assert 0 < manifest["linesDropped"] < 300

    gen = list(sft_artifacts(ctx, "generator").read_outputs())
    ext = list(sft_artifacts(ctx, "extender").read_outputs())
    assert len(gen) == len(ext) == 30
    keys = ctx.store.list("sft/iter-01/build-sft")
    assert "sft/iter-01/build-sft/generator/part-00000.jsonl" in keys
    assert "sft/iter-01/build-sft/extender/part-00004.jsonl" in keys  # 30 rows in shards of 7
    assert {"sft/iter-01/build-sft/manifest.json", "sft/iter-01/build-sft/_SUCCESS"} <= set(keys)
    assert ctx.artifacts("build-sft").manifest()["counts"] == manifest["counts"]

    by_id = {r["id"]: r for r in rows}
    for g, e in zip(gen, ext):
        src = by_id[g["id"]]
        assert g["messages"] == [{"role": "user", "content": src["instruction"]},
                                 {"role": "assistant", "content": src["extended"]}]
        assert e["messages"][1] == {"role": "assistant", "content": src["extended"]}
        user = e["messages"][0]["content"]
        assert e["messages"][0]["role"] == "user"
        # the extend prompt of the row's language, around a line-dropped initial response
        head = prompts.render(src["language"], "extend", instruction=src["instruction"], response="@@").split("@@")[0]
        assert user.startswith(head)
        shortened = user[len(head):]
        kept = [line for line in shortened.split("\n") if line.strip()]
        assert set(kept) <= set(src["initial"].split("\n"))
    assert manifest["averageWords"]["generator"] > manifest["averageWords"]["extenderInput"]


def test_build_sft_is_reproducible_and_seeded(tmp_path):
    rows = extend_rows(12)
    first = make_ctx(tmp_path / "a", rows)
    run_stage("build-sft", first)
    again = make_ctx(tmp_path / "b", rows)
    run_stage("build-sft", again)
    other = make_ctx(tmp_path / "c", rows, seed=7)
    run_stage("build-sft", other)
    ext = lambda ctx: [r["messages"][0]["content"] for r in sft_artifacts(ctx, "extender").read_outputs()]  # noqa: E731
    assert ext(first) == ext(again)
    assert ext(first) != ext(other)


def test_build_sft_line_drop_probability_is_configurable(tmp_path):
    ctx = make_ctx(tmp_path, extend_rows(10), buildSft={"lineDropProbability": 0.0})
    manifest = run_stage("build-sft", ctx)
    assert manifest["linesDropped"] == 0


def test_build_sft_needs_extend_and_some_rows(tmp_path):
    store = LocalStore(tmp_path / "store")
    cfg = RunConfig.model_validate({"name": "sft", "storage": {"uri": f"file://{tmp_path}/store"}})
    with pytest.raises(StageError, match="extend"):
        run_stage("build-sft", StageContext(config=cfg, iteration=1, store=store))
    with pytest.raises(StageError, match="no responses"):
        run_stage("build-sft", make_ctx(tmp_path / "empty", []))


def test_build_sft_without_rows_says_why_from_the_manifests_and_what_to_change(tmp_path):
    ctx = make_ctx(tmp_path, [])
    ctx.artifacts("respond").finish({"counts": {"requested": 10, "accepted": 1, "rejected": {"ending": 18}}})
    ctx.artifacts("extend").finish({"counts": {"requested": 1, "accepted": 0,
                                               "rejected": {"growth": 2, "meta-talk": 2, "no-growth": 1}}})
    with pytest.raises(StageError) as err:
        run_stage("build-sft", ctx)
    message = str(err.value)
    assert "respond kept 1 of 10 (tries rejected: ending 18)" in message
    assert "extend kept 0 of 1 (tries rejected: growth 2, meta-talk 2, no-growth 1)" in message
    assert "respond.maxTokens" in message and "extend.minGrowth" in message and "--restart-from" in message
    assert not ctx.artifacts("build-sft").done()
