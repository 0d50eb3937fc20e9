"""Smoke tests of bench/: every benchmark runs at a tiny size and produces its table rows. No timing assertions
(the numbers live in bench/results/ with the machine they ran on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # last: the repository's operator/ must not shadow the standard library

from bench.common import Row, table  # noqa: E402
from bench.sim_engine import SimModel  # noqa: E402
from bench.sim_text import generate  # noqa: E402

ROW_KEYS = {"benchmark", "ours", "baseline", "ratio", "goal", "met", "unit", "status", "note", "details"}


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    [result] = list(tmp_path.glob("*-quick.json"))
    data = json.loads(result.read_text())
    assert data["quick"] is True and data["machine"]["cores"] >= 1 and data["machine"]["cpuModel"]
    assert not (tmp_path / "latest.md").exists(), "a quick run must not replace the latest full results"
    return proc, data["rows"]


def measured(rows: list[dict], prefix: str) -> list[dict]:
    found = [r for r in rows if r["benchmark"].startswith(prefix)]
    assert found, f"no {prefix!r} rows in {[r['benchmark'] for r in rows]}"
    for r in found:
        assert set(r) == ROW_KEYS
        assert r["status"] == "ok", r
        assert r["ours"] is not None and r["baseline"] is not None and r["ours"] > 0 and r["baseline"] > 0, r
        assert r["goal"]
    return found


def test_quick_run_prints_and_writes_every_table_row(tmp_path):
    proc, rows = run_bench(tmp_path, "--skip", "vllm")
    header = proc.stdout.splitlines()[0].split()
    assert header == ["benchmark", "ours", "baseline", "ratio", "goal", "met?"]
    for r in rows:
        assert r["benchmark"] in proc.stdout

    saturation = measured(rows, "saturation:")
    assert len(saturation) == 4  # (a)/(c) tokens/s, (b)/(a) wall time, (a)/(c) at the shipped and adaptive
    details = saturation[0]["details"]
    for driver in ("ours", "reference", "shipped", "adaptive"):
        assert set(details[driver]["stages"]) == {"self-instruct", "respond", "extend"}
        assert details[driver]["tokens"] > 0
    assert details["ours"]["stages"]["extend"]["counts"]["accepted"] > 0  # the filters let a share through

    [long] = [r for r in rows if r["benchmark"].startswith("long context:")]
    assert long["met"] is True and long["ours"] == 1.0, long  # ran to the end, nothing refused by the server
    assert long["details"]["counts"]["rejected"]["context"] > 0 and long["details"]["server"]["refused"] == 0
    [si] = measured(rows, "self-instruct: generated tokens")
    assert si["met"] is True and si["ratio"] >= 10, si  # the stop string at the next item saves the tokens

    scale = measured(rows, "scale:")
    assert any("exponent" in r["benchmark"] for r in scale)
    assert {r["benchmark"].split()[1] for r in scale if "RSS" in r["benchmark"]} == {"respond", "extend"}

    operator = measured(rows, "operator:")  # reconcile latency to first child and to first status, peak RSS
    assert len(operator) == 3
    for row in operator[:2]:
        n = row["details"]["nLoad"]
        assert len(row["details"]["loadSeconds"]) == n and len(row["details"]["singleSeconds"]) >= 1
    assert operator[2]["details"]["rssBytes"]["peak"] >= operator[2]["details"]["rssBytes"]["idle"] > 0

    training = measured(rows, "training (batch 1): ")
    assert len(training) == 3  # tokens/s ours / TRL padding-free, the held-out loss drop, tokens/s ours / TRL packing
    assert training[0]["details"]["size"]["batch_size"] == 1
    for pair in training[0]["details"]["pairs"]:  # the same work: real tokens; padding-free the same steps too
        for method in ("paddingFree", "packing"):
            assert pair["ours"]["tokensSeen"] == pair[method]["tokensSeen"] == pair["ours"]["tokens"] > 0
        assert pair["ours"]["steps"] == pair["paddingFree"]["steps"] > pair["packing"]["steps"] > 0
    [cuda] = [r for r in rows if r["benchmark"].startswith("training (CUDA)")]
    assert cuda["status"] == "ok" or (cuda["status"] == "skipped" and "cuda" in cuda["note"] and cuda["ours"] is None)

    [hostile] = measured(rows, "hostile input:")  # every input refused, each timed (the corpus and generated ones)
    assert "NOT refused" not in hostile["note"] and len(hostile["details"]["ours"]) > 60

    cluster = measured(rows, "cluster (simulated):")  # tuned and shipped against the bound, reference / tuned
    assert len(cluster) == 3
    schedules = cluster[0]["details"]["schedules"]
    for s in schedules:  # nothing beats the zero-gap bound; every phase took time
        assert s["seconds"] >= s["boundSeconds"] > 0 and 0 < s["busyFraction"] <= 1
        assert s["generatedTokens"] > 0 and all(v >= 0 for v in s["phases"].values())
    ref = schedules[0]
    assert ref["killedRequests"] > 0 and ref["generatedTokens"] < schedules[1]["generatedTokens"]  # the 95 % kill


    operator_rows = measured(rows, "cluster, real operator:")  # bound and reference ratios, example and best
    assert len(operator_rows) == 4
    for v in operator_rows[0]["details"]["variants"]:
        assert v["phase"] == "Succeeded" and v["seconds"] >= v["boundSeconds"] > 0 and v["childrenAdmitted"] > 0


def test_real_operator_drives_the_simulated_cluster_on_a_tiny_setting():
    """The operator's reconcile in the loop of the cluster model: deterministic; its schedule as the operator
    makes it (evaluation k beside k+1's self-instruct on one server, build-sft as vLLM goes down, both training
    Jobs at once with training.concurrent); the cache claim makes the serving start shorter."""
    import dataclasses

    from bench.cluster import Cluster, Workload
    from bench.cluster_operator import example_spec, simulate

    c = Cluster()
    w = dataclasses.replace(Workload(), instructions=12, eval_requests=4, train_tokens=2e6)
    a, b = (simulate(example_spec(), c, w, seed=1) for _ in range(2))
    assert a == b and a["phase"] == "Succeeded" and a["seconds"] >= a["boundSeconds"] > 0
    # the example's gradientCheckpointing: auto, decided by the trainer's estimate: a 16k-token step needs it
    assert a["spec"]["gradientCheckpointing"]["enabled"] is True
    # ... yet per batch: the workload's examples are mostly short, so they pay far less than every layer's 1.46
    every = simulate(example_spec(**{"training.gradientCheckpointing": True}), c, w, seed=1)
    assert all(1.0 < f < 1.2 for f in a["spec"]["trainFlopsShare"]), a["spec"]
    assert every["spec"]["trainFlopsShare"] == [pytest.approx(1.4643, abs=1e-3)] * 2
    assert every["seconds"] > a["seconds"]
    steps = a["steps"]
    assert steps["bench-i02-evaluate-a1"]["start"] == steps["bench-i03-self-instruct-a1"]["start"]
    assert steps["bench-i03-build-sft-a1"]["start"] == steps["bench-m02-vllm-a1"]["scale-down"]
    assert steps["bench-i03-train-generator-a1"]["start"] < steps["bench-i03-train-extender-a1"]["start"]
    cold = simulate(example_spec(**{"inference.modelCacheClaim": None}), c, w, seed=1)
    assert cold["steps"]["bench-m02-vllm-a1"]["ready"] > steps["bench-m02-vllm-a1"]["ready"]
    both = simulate(example_spec(**{"training.concurrent": True, "training.processesPerNode": 4}), c, w,
                    seed=1)["steps"]
    assert both["bench-i03-train-generator-a1"]["start"] == both["bench-i03-train-extender-a1"]["start"]
    # the client as the spec's settings make it: per connection by default, adaptive with both client knobs
    assert a["spec"]["client"] == "connections"
    tuned = simulate(example_spec(**{"client.adaptiveConcurrency": True, "client.balancePerRequest": True}), c, w,
                     seed=1)
    assert tuned["spec"]["client"] == "adaptive"


def test_vllm_client_benchmark_against_the_simulated_server(tmp_path):
    _, rows = run_bench(tmp_path, "--only", "vllm")
    [row] = measured(rows, "simulated server (smoke)")
    assert row["details"]["ours"][0]["tokens"] == row["details"]["theirs"][0]["tokens"] > 0  # same work


@pytest.mark.vllm
def test_vllm_client_benchmark_against_real_vllm(tmp_path, vllm_endpoint):
    _, rows = run_bench(tmp_path, "--only", "vllm", "--vllm-endpoint", vllm_endpoint)
    [row] = measured(rows, "real vLLM")
    assert row["details"]["ours"][0]["tokens"] == row["details"]["theirs"][0]["tokens"] > 0


def test_simulated_model_is_deterministic_and_saturates():
    m = SimModel(peak_tokens_per_s=1000, saturation=8, curve=0.6)
    assert [m.throughput(n) for n in (8, 9, 64)] == [1000, 1000, 1000]  # flat beyond saturation
    assert all(m.throughput(n) < m.throughput(n + 1) for n in range(0, 8))  # rising up to it
    body = {"model": "generator", "messages": [{"role": "user", "content": "Write an essay."}], "seed": 3,
            "max_tokens": 4096}
    assert generate(m, body, b"") == generate(m, dict(body), b"")
    assert generate(m, body, b"") != generate(m, {**body, "seed": 4}, b"")
    text, tokens, _, finish, kind = generate(m, {**body, "max_tokens": 5}, b"")
    assert (tokens, finish, kind) == (5, "length", "respond") and len(text.split()) == 5


def test_cluster_model_is_deterministic_and_bounded_by_the_kv_cache():
    from bench.cluster import Cluster, Replica, Request, Schedule, Workload, macro_iteration

    c = Cluster(kv_tokens=10_000)
    r = Replica(c)
    for i in range(10):
        r.waiting.append(Request(1000, 2000, [], seq=i))
    r.admit()
    assert r.running == 3 and r.reserved == 9000 and len(r.waiting) == 7  # the fourth would not fit
    short = r.step()
    r.advance(1.0)
    assert r.step() > short and r.context() > 3000  # the batch reads more KV as it decodes
    w = Workload(instructions=30, eval_requests=6, train_tokens=1e6)
    a, b = (macro_iteration(Cluster(), Schedule("x"), w, seed=3) for _ in range(2))
    assert a == b
    assert macro_iteration(Cluster(), Schedule("x"), w, seed=4)["seconds"] != a["seconds"]
    tuned = macro_iteration(Cluster(), Schedule("y", client="adaptive", cached_starts=True, checkpointing=False), w, 3)
    assert tuned["seconds"] < a["seconds"] and tuned["generatedTokens"] == a["generatedTokens"]


def test_table_marks_goals_and_pending_rows():
    rows = [Row("a", 2.0, 1.0, 2.0, ">= 1", True), Row("b", 0.5, 1.0, 0.5, ">= 1", False),
            Row("c", None, None, None, "-", None, status="pending")]
    lines = table(rows).splitlines()
    assert lines[2].split()[-1] == "yes" and lines[3].split()[-1] == "NO" and lines[4].split()[-1] == "pending"
    assert table(rows, markdown=True).startswith("| benchmark | ours | baseline | ratio | goal | met? |")


def test_gpu_script_plans_without_a_gpu(tmp_path, capsys):
    """bench/gpu.py is for a lent GPU: here only its arguments, its plan and its CPU-side pieces run."""
    from bench import gpu

    assert gpu.main(["--dry-run", "--out", str(tmp_path), "--concurrencies", "64", "16", "64"]) == 0
    plan = json.loads(capsys.readouterr().out)
    vllm, training = plan["steps"]
    assert vllm["baseline"]["concurrencies"] == [16, 64] and vllm["ours"]["concurrencies"][1] == 32
    assert training["size"]["batch_size"] == 1 and training["methods"][1:] == ["paddingFree", "packing"]
    assert plan["out"].startswith(str(tmp_path)) and not list(tmp_path.iterdir())  # nothing written
    assert [s["part"] for s in gpu.plan(gpu.parse_args(["--only", "training"]))["steps"]] == ["training"]
    for bad in (["--concurrencies", "0"], ["--requests", "-1"], ["--peak-tflops", "0"], ["--only", "nothing"]):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)
    # MFU's FLOPs: 4N per token for LoRA, N of the 0.5B shape being Qwen2-0.5B's 494M parameters (tied head)
    assert gpu.flops_per_token(gpu.QWEN2_05B, 0) / 4 == pytest.approx(494.0e6, rel=0.002)
    assert gpu.flops_per_token(gpu.QWEN2_05B, 1000, "full") > gpu.flops_per_token(gpu.QWEN2_05B, 1000)
    assert gpu.peak_flops("NVIDIA H200", None) == 989e12 and gpu.peak_flops("Mystery GPU", None) is None
    requests = gpu.extend_requests(6, 300, 0.5, 64)
    assert len({r["seed"] for r in requests}) == 6 and all(r["max_tokens"] == 64 and r["ignore_eos"] for r in requests)
    assert all("Rewrite the answer" in r["messages"][0]["content"] and "$response" not in r["messages"][0]["content"]
               for r in requests)
