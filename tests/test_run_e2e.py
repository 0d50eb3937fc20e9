"""End to end: `selflengthen run` with the tiny example (examples/local-tiny.yaml, plus a small collect) on this
machine: two macro-iterations on a real vLLM CPU server, LoRA training of both roles, iteration 2 and the
evaluation served from the trained adapters (seen in /v1/models), a LonGen score, a report per iteration with
the length plot, LongBench-Write and LongWrite-Ruler, the collect stage's SFT data after the last iteration, and
the length-following model trained on it, served and evaluated. Several minutes on two cores."""

from __future__ import annotations

import httpx
import pytest
import yaml

from selflengthen.cli import main
from selflengthen.pipeline import runner
from selflengthen.pipeline.longen import demand_holds, parse_length_demand
from selflengthen.pipeline.stages import RunArtifacts
from selflengthen.pipeline.store import LocalStore, read_json
from selflengthen.pipeline.text import count_words

pytestmark = pytest.mark.vllm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_selflengthen_run_two_iterations_with_reports(tmp_path, monkeypatch, capsys):
    config = yaml.safe_load(open("examples/local-tiny.yaml"))
    config["collect"] = {"enabled": True, "items": 6}
    config["lengthFollowing"] = {"enabled": True}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("SELFLENGTHEN_WORKDIR", str(tmp_path / "work"))

    served: list[tuple[str, int, list[str]]] = []  # (stage, iteration, /v1/models) of each server started
    for_stage = runner.Endpoints.for_stage

    def recording(self, stage, iteration):
        before = self.server
        endpoint = for_stage(self, stage, iteration)
        if self.server is not before:
            ids = [m["id"] for m in httpx.get(f"{endpoint}/models", timeout=30).json()["data"]]
            served.append((stage, iteration, sorted(ids)))
        return endpoint

    monkeypatch.setattr(runner.Endpoints, "for_stage", recording)
    assert main(["run", str(path), "--storage", f"file://{tmp_path}/store", "--no-progress"]) == 0
    out = capsys.readouterr().out

    # Iteration 1's data stages on the base model; its evaluation, iteration 2 and collect on the adapters.
    assert served[0] == ("self-instruct", 1, ["base", "extender", "generator"])  # the base under its own name too
    assert ("evaluate", 1, ["base", "extender", "generator"]) in served
    # ... and the length-following model's evaluation on its adapter, served as the Generator
    assert served[-1] == ("evaluate-length-following", 2, ["base", "generator"])
    assert all(ids == ["base", "extender", "generator"] for stage, k, ids in served[1:-1])
    assert {k for _, k, _ in served} == {1, 2}

    store = LocalStore(tmp_path / "store")
    for k in (1, 2):
        doc = read_json(store, f"local-tiny/report/iter-{k:02d}.json")
        assert doc["complete"] and [h["iteration"] for h in doc["history"]] == list(range(1, k + 1))
        evaluate = read_json(store, f"local-tiny/iter-{k:02d}/evaluate/manifest.json")
        assert doc["longen"]["overall"] == evaluate["scores"]["overall"] is not None
        extend = read_json(store, f"local-tiny/iter-{k:02d}/extend/manifest.json")
        assert doc["lengths"]["extendedAverage"] == extend["averageWords"]
        train = read_json(store, f"local-tiny/iter-{k:02d}/train-generator/manifest.json")
        assert doc["training"]["generator"]["finalLoss"] == train["finalLoss"]
        md = store.read(f"local-tiny/report/iter-{k:02d}.md").decode()
        assert md.startswith(f"# Run local-tiny: iteration {k} of 2\n")
        assert md.rstrip() in out  # stdout shows the reports
    assert store.read("local-tiny/report/lengths.png").startswith(PNG_SIGNATURE)
    assert "| 2 |" in store.read("local-tiny/report/iter-02.md").decode()  # the per-iteration table has both

    # Collect: after the last iteration, SFT rows whose length demands hold for their responses.
    collect = read_json(store, "local-tiny/collect/manifest.json")
    assert collect["iteration"] == 2 and collect["counts"]["final"] + collect["counts"]["failed"] == 6
    assert collect["bySource"].get("iteration-1", 0) + collect["bySource"].get("iteration-2", 0) > 0
    assert read_json(store, "local-tiny/report/iter-02.json")["collect"]["accepted"] == collect["counts"]["accepted"]
    rows = list(RunArtifacts(store, "local-tiny", 2, "collect").read_outputs())
    assert len(rows) == collect["counts"]["accepted"] > 0
    for row in rows:
        user, assistant = row["messages"]
        assert demand_holds(parse_length_demand(user["content"]), count_words(assistant["content"]))

    # LongBench-Write and the ruler in every evaluation, with the scatter plot
    for k in (1, 2):
        evaluate = read_json(store, f"local-tiny/iter-{k:02d}/evaluate/manifest.json")
        assert evaluate["counts"]["byBenchmark"] == {"longen": 24, "longbench-write": 8, "ruler": 6}
        assert 0 <= evaluate["longbenchWrite"]["sl"]["overall"] <= 100 and evaluate["ruler"]["maxLength"] > 0
    assert store.read("local-tiny/report/longbench-write.png").startswith(PNG_SIGNATURE)

    # The length-following step: trained from the last Generator on collect's rows and the last Generator set,
    # evaluated on the same items; the last report puts both side by side.
    train = read_json(store, "local-tiny/train-length-following/manifest.json")
    assert train["initFrom"].endswith("local-tiny/iter-02/train-generator/model")
    assert train["examplesBySource"]["local-tiny/collect"] == len(rows)
    after = read_json(store, "local-tiny/evaluate-length-following/manifest.json")
    assert after["counts"]["byBenchmark"] == {"longen": 24, "longbench-write": 8, "ruler": 6}
    doc = read_json(store, "local-tiny/report/iter-02.json")
    assert doc["lengthFollowing"]["after"]["longen"] == after["scores"]["overall"]
    assert doc["lengthFollowing"]["before"]["longen"] == doc["longen"]["overall"]
    assert "## Length following" in store.read("local-tiny/report/iter-02.md").decode()
