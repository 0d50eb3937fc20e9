"""The iteration report (pipeline/report.py), built from hand-made stage manifests in a real local store: its
numbers are the manifests' numbers, the Markdown shows them, the plot is a PNG of one point per iteration, a
missing matplotlib only drops the PNG, and `selflengthen stage` leaves the report behind."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from selflengthen.pipeline import report as rep
from selflengthen.pipeline.artifacts import StageArtifacts
from selflengthen.pipeline.config import dump_config, parse_config
from selflengthen.pipeline.stages import RunArtifacts
from selflengthen.pipeline.store import LocalStore, dumps_jsonl, read_json

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def manifests(k: int) -> dict[str, dict]:
    """Plausible manifests of iteration k, lengths growing with k."""
    return {
        "self-instruct": {"counts": {"requested": 16, "accepted": 12 + k, "failed": 4 - k, "requests": 20,
                                     "rejected": {"length": 3, "duplicate": 2 + k}}, "averageWords": 21.5},
        "respond": {"counts": {"instructions": 12 + k, "requested": 26, "passed": 24, "failed": 2, "droppedShort": 4,
                               "accepted": 20, "requests": 30, "rejected": {"ngram": 4}},
                    "averageWords": 40.0 * k + 0.5, "maxWords": 70 * k,
                    "heldout": {"model": "generator", "items": 4, "averageWords": 30.0 * k, "maxWords": 50 * k,
                                "truncated": 0, "answers": []}},
        "extend": {"counts": {"responses": 20, "requested": 20, "passed": 18, "failed": 2, "droppedShort": 3,
                              "accepted": 15, "requests": 80, "rejected": {"growth": 2, "no-growth": 5}},
                   "averageWordsInitial": 41.0 * k, "averageWords": 66.25 * k, "maxWords": 150 * k, "growth": 1.616},
        "build-sft": {"counts": {"requested": 15, "accepted": 15, "generator": 15, "extender": 15}},
        # firstLoss/finalLoss: single logged steps (batch 1: noisy); epochLosses: the mean of each epoch
        "train-generator": {"mode": "lora", "steps": 8, "firstLoss": 3.25, "finalLoss": 2.0 / k,
                            "epochLosses": [4.0, 2.0 / k], "trainSeconds": 11.5,
                            "counts": {"requested": 15, "accepted": 14, "promptCut": 2, "droppedOverLength": 1}},
        "train-extender": {"mode": "lora", "steps": 8, "firstLoss": 3.5, "finalLoss": 2.5 / k,
                           "epochLosses": [4.5, 3.0, 2.5 / k], "trainSeconds": 12.5,
                           "counts": {"requested": 15, "accepted": 15}},
        "evaluate": {"enabled": True, "model": "generator", "counts": {"requested": 24, "accepted": 24, "truncated": 3,
                                                                       "byBenchmark": {"longen": 15,
                                                                                       "longbench-write": 3,
                                                                                       "ruler": 6}},
                     "scores": {"overall": 0.125 * k, "byType": {"about": 0.2, "range": 0.1, "above": 0.05,
                                                                  "below": 0.15},
                                "byLanguage": {"en": 0.125 * k}, "byRange": {}},
                     "averageWords": 55.5 * k, "maxWords": 200 * k,
                     "heldout": {"model": "generator", "items": 4, "averageWords": 30.0 * k + 12.5, "maxWords": 60 * k,
                                 "truncated": 1, "answers": []},
                     "quality": {"model": "judge", "mean": 6.5, "scored": 23, "unparsed": 1, "byType": {}},
                     "longbenchWrite": {
                         "items": 3, "count": "longwriter", "averageLength": 100.0 * k, "maxLength": 200 * k,
                         "sl": {"overall": 20.0 * k, "byLanguage": {"en": 25.0 * k, "zh": 10.0 * k},
                                "byBucket": {"0-500": 30.0 * k, "4k+": 5.0 * k}},
                         "sq": {"model": "judge", "overall": 60.0, "scored": 3, "unparsed": 0, "byLanguage": {},
                                "dimensions": {"relevance": 3.5}},
                         "s": 40.0 + 10 * k,
                         "points": [[100, 50 * k, "en"], [400, 100 * k, "en"], [5000, 200 * k, "zh"]]},
                     "ruler": {"items": 6, "count": "longwriter", "maxLength": 500 * k, "averageLength": 120.0,
                               "byRequired": {"1000": {"average": 200.0, "max": 300}, "30000": {"average": 90.0,
                                                                                               "max": 500 * k}}}},
    }


def config(**overrides):
    return parse_config({"name": "rep", "iterations": 3, "storage": {"uri": "file:///unused"}, **overrides})


def fill(store, cfg, k: int, stages=None) -> dict[str, dict]:
    made = manifests(k)
    for stage in stages or made:
        StageArtifacts(store, cfg.name, k, stage).finish({**made[stage], "durationSeconds": 1.5 * k})
    return made


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def test_report_numbers_are_the_manifests(store):
    cfg = config()
    fill(store, cfg, 1)
    made = fill(store, cfg, 2)
    out = rep.write_report(store, cfg, 2)

    doc = read_json(store, "rep/report/iter-02.json")
    assert doc == {k: v for k, v in out.items() if k not in ("markdown", "keys")}
    assert doc["iteration"] == 2 and doc["complete"] and doc["pending"] == []
    assert list(doc["stages"]) == list(made)  # iteration order
    for stage, manifest in made.items():
        row, counts = doc["stages"][stage], manifest["counts"]
        assert row["requested"] == counts["requested"] and row["accepted"] == counts["accepted"]
        assert row["acceptance"] == round(counts["accepted"] / counts["requested"], 4)
        assert row["rejected"] == counts.get("rejected", {}) and row["durationSeconds"] == 3.0
    assert doc["lengths"] == {"initialAverage": 80.5, "initialMax": 140, "extendedAverage": 132.5,
                              "extendedMax": 300, "extendedFromAverage": 82.0, "growth": 1.616,
                              "longenAverage": 111.0, "longenScore": 0.25, "heldoutBefore": 60.0,
                              "heldoutAfter": 72.5}
    assert doc["training"]["generator"] == {"mode": "lora", "steps": 8, "examples": 14, "firstLoss": 3.25,
                                            "finalLoss": 1.0, "trainSeconds": 11.5, "epochLosses": [4.0, 1.0],
                                            "promptCut": 2, "droppedOverLength": 1}
    assert doc["training"]["extender"]["finalLoss"] == 1.25
    assert doc["longen"]["overall"] == 0.25 and doc["longen"]["items"] == 15  # LonGen's, not all 24 evaluated
    assert doc["longen"]["byType"] == made["evaluate"]["scores"]["byType"]
    assert doc["longen"]["quality"]["mean"] == 6.5
    assert [h["iteration"] for h in doc["history"]] == [1, 2]
    assert [h["extendedAverage"] for h in doc["history"]] == [66.25, 132.5]
    assert doc["plot"] == "rep/report/lengths.png" and doc["collect"] is None

    md = store.read("rep/report/iter-02.md").decode()
    assert md == out["markdown"] and md.startswith("# Run rep: iteration 2 of 3\n")
    assert "| respond | 26 | 20 | 77% | 30 | ngram 4 | 3.0 |" in md
    assert "| extend | 20 | 15 | 75% | 80 | growth 2, no-growth 5 | 3.0 |" in md
    assert "| initial | 80.5 | 140 |" in md and "| extended | 132.5 | 300 |" in md
    assert "| model | mode | steps | examples | epochs | mean loss, first epoch -> last epoch | seconds |" in md
    assert "| generator | lora | 8 | 14 | 2 | 4.000 -> 1.000 | 11.5 |" in md
    assert "| extender | lora | 8 | 15 | 3 | 4.500 -> 1.250 | 12.5 |" in md
    assert "over `training.cutoffTokens` (no answer is ever cut): generator 2 with the prompt cut, 1 left out." in md
    assert "score **0.250** on 15 items" in md and "mean **6.50** / 10 on 23 answers (1 without" in md
    assert "| 1 | 40.5 | 70 | 66.2 | 150 | x1.62 | 30.0 | 42.5 | 55.5 | 0.125 |" in md
    assert "| 2 | 80.5 | 140 | 132.5 | 300 | x1.62 | 60.0 | 72.5 | 111.0 | 0.250 |" in md
    assert "answered with 60.0 words on average before this iteration's training, 72.5 after it." in md
    assert "![Response length per iteration](lengths.png)" in md
    # LongBench-Write and the ruler: the manifest's numbers, the count named, a row per iteration
    assert doc["longbenchWrite"]["sl"] == made["evaluate"]["longbenchWrite"]["sl"]
    assert "points" not in doc["longbenchWrite"] and doc["ruler"]["maxLength"] == 1000
    assert "Length score S_l **40.0** / 100 on 3 items (by language: en 50.0, zh 20.0)" in md
    assert "LongWriter's count" in md and "| S_l | 60.0 | 10.0 |" in md
    assert "Quality S_q (judge, six dimensions rated 1-5, x20): **60.0** on 3 answers (relevance 3.50)" in md
    assert "S = (S_l + S_q) / 2 = **60.0**" in md
    assert "Maximum output length **1000** (LongWriter's count) over 6 prompts" in md
    assert "| 1 | 0.125 | 20.0 | 60.0 | 500 |" in md and "| 2 | 0.250 | 40.0 | 60.0 | 1000 |" in md
    assert [(h["longbenchSl"], h["rulerMax"]) for h in doc["history"]] == [(20.0, 500), (40.0, 1000)]


def test_longbench_scatter_is_log_log_with_a_colour_per_iteration(store):
    cfg = config()
    for k in (1, 2):
        fill(store, cfg, k)
    out = rep.write_report(store, cfg, 2)
    assert store.read("rep/report/longbench-write.png").startswith(PNG_SIGNATURE) and out["scatter"] in out["keys"]
    assert "![LongBench-Write: required against produced length](longbench-write.png)" in out["markdown"]
    points = rep.scatter_points(store, cfg, 2)
    assert points == {f"iteration {k}": manifests(k)["evaluate"]["longbenchWrite"]["points"] for k in (1, 2)}
    ax = rep.scatter_figure(points).axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    drawn = {c.get_gid(): c.get_offsets().tolist() for c in ax.collections}
    assert drawn == {"iteration 1": [[100, 50], [400, 100], [5000, 200]],
                     "iteration 2": [[100, 100], [400, 200], [5000, 400]]}


def test_plot_is_a_png_with_one_point_per_iteration(store):
    cfg = config()
    for k in (1, 2, 3):
        fill(store, cfg, k)
    out = rep.write_report(store, cfg, 3)
    png = store.read("rep/report/lengths.png")
    assert png.startswith(PNG_SIGNATURE) and out["plot"] in out["keys"]

    history = out["history"]
    series = rep.plot_series(history)
    assert set(series) == {key for key, _, _ in rep.SERIES}
    assert series["extendedAverage"] == [(1, 66.25), (2, 132.5), (3, 198.75)]
    assert series["initialMax"] == [(1, 70.0), (2, 140.0), (3, 210.0)]
    # What the figure draws is that data: one line per series, three points each.
    fig = rep.length_figure(history)
    lines = {line.get_gid(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == set(series)
    for key, points in series.items():
        assert [tuple(p) for p in lines[key].get_xydata().tolist()] == [(float(i), w) for i, w in points]


def test_the_loss_plot_draws_each_epochs_mean_over_the_iterations(store):
    cfg = config()
    for k in (1, 2):
        fill(store, cfg, k)
    out = rep.write_report(store, cfg, 2)
    assert store.read("rep/report/loss.png").startswith(PNG_SIGNATURE) and "rep/report/loss.png" in out["keys"]
    assert "![Training loss per epoch](loss.png)" in out["markdown"]
    series = rep.loss_series(out["history"])
    assert series["generator"] == [(0.5, 4.0), (1.0, 2.0), (1.5, 4.0), (2.0, 1.0)]
    assert [x for x, _ in series["extender"]] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
    fig = rep.loss_figure(out["history"])
    lines = {line.get_gid(): line for line in fig.axes[0].get_lines()}
    assert [tuple(p) for p in lines["generator"].get_xydata().tolist()] == series["generator"]


def test_report_of_an_unfinished_iteration_and_gaps_in_the_plot(store):
    cfg = config(evaluate={"enabled": False})
    fill(store, cfg, 1, ["self-instruct", "respond", "extend", "build-sft", "train-generator", "train-extender"])
    fill(store, cfg, 2, ["self-instruct", "respond"])
    out = rep.write_report(store, cfg, 2)
    assert not out["complete"] and out["pending"] == ["extend", "build-sft", "train-generator", "train-extender"]
    assert out["longen"] is None and "evaluate" not in out["pending"]
    assert out["lengths"]["extendedAverage"] is None and out["lengths"]["initialAverage"] == 80.5
    assert "(in progress: extend, build-sft, train-generator, train-extender to do)" in out["markdown"]
    series = rep.plot_series(out["history"])
    assert series["initialAverage"] == [(1, 40.5), (2, 80.5)] and series["extendedAverage"] == [(1, 66.25)]
    assert series["longenAverage"] == []


def test_the_plot_covers_later_iterations_when_an_earlier_report_is_refreshed(store):
    cfg = config()
    for k in (1, 2):
        fill(store, cfg, k)
    out = rep.write_report(store, cfg, 1)
    assert [h["iteration"] for h in out["history"]] == [1]  # the report of iteration 1 is about 1..1
    assert store.read("rep/report/lengths.png").startswith(PNG_SIGNATURE)
    # ... and the plot (one file) still shows both iterations: drawn from the history up to the last one.
    assert [h["iteration"] for h in rep.build_report(store, cfg, 2)["history"]] == [1, 2]


def test_collect_appears_in_the_last_iterations_report(store):
    cfg = config(iterations=1, collect={"enabled": True})
    fill(store, cfg, 1)
    RunArtifacts(store, "rep", 1, "collect").finish({
        "enabled": True, "counts": {"requested": 8, "accepted": 6, "failed": 2, "extended": 5, "requests": 30,
                                    "rejected": {"short": 2}},
        "byType": {"about": 2, "range": 1, "above": 2, "below": 1}, "byLanguage": {"en": 6},
        "averageWordsInitial": 30.0, "averageWords": 45.5, "maxWords": 90, "output": "rep/collect/"})
    out = rep.write_report(store, cfg, 1)
    assert out["stages"]["collect"]["accepted"] == 6 and out["stages"]["collect"]["acceptance"] == 0.75
    assert out["collect"]["byType"] == {"about": 2, "range": 1, "above": 2, "below": 1}
    assert "6 of 8 pairs kept (5 extended), average 45.5 words" in out["markdown"]


def test_without_matplotlib_the_report_has_no_plot(store, monkeypatch, caplog):
    cfg = config()
    fill(store, cfg, 1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in the operator image: import fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with caplog.at_level(logging.INFO, "selflengthen.report"):
        out = rep.write_report(store, cfg, 1)
    assert out["plot"] is None and not store.exists("rep/report/lengths.png")
    assert store.exists("rep/report/iter-01.json") and "lengths.png" not in out["markdown"]
    assert "matplotlib is not installed" in caplog.text


def test_a_report_that_cannot_be_written_only_warns(store, caplog):
    cfg = config()
    fill(store, cfg, 1)

    class ReadOnly(LocalStore):
        def write(self, key, data, *, if_absent=False):
            raise PermissionError(f"read-only store: {key}")

    with caplog.at_level(logging.WARNING, "selflengthen.report"):
        assert rep.refresh_report(ReadOnly(store.root), cfg, 1) is None
    assert "report of iteration 1 not written: PermissionError" in caplog.text


def test_the_stage_command_leaves_the_report(tmp_path, capsys):
    """`selflengthen stage build-sft` (no server needed) refreshes the iteration's report; stdout stays the
    manifest alone, as Jobs and tests parse it."""
    from selflengthen.cli import main

    cfg = config(iterations=2, storage={"uri": f"file://{tmp_path}/store"})
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    store = LocalStore(tmp_path / "store")
    fill(store, cfg, 1, ["self-instruct", "respond"])
    extend = StageArtifacts(store, "rep", 1, "extend")
    store.write(extend.key("part-00000.jsonl"), dumps_jsonl(
        {"id": f"x{i}", "language": "en", "instruction": "Write a story.", "initial": "One.\nTwo.",
         "extended": "One and more.\nTwo and more.\nThree.", "initialWords": 2, "words": 7} for i in range(3)))
    extend.finish(manifests(1)["extend"])
    assert main(["stage", "build-sft", "--config", str(path), "--iteration", "1"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["counts"]["accepted"] == 3
    doc = read_json(store, "rep/report/iter-01.json")
    assert doc["stages"]["build-sft"]["accepted"] == 3 and doc["pending"][0] == "train-generator"
    assert store.exists("rep/report/iter-01.md") and store.read("rep/report/lengths.png").startswith(PNG_SIGNATURE)
