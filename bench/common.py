"""What every benchmark shares: the table row, the machine description, small timing helpers."""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One line of the table. `ratio` is ours relative to the baseline, oriented so that bigger is better
    unless the goal says otherwise; `met` is None when there is no goal or no number (pending, skipped)."""

    benchmark: str
    ours: float | None
    baseline: float | None
    ratio: float | None
    goal: str
    met: bool | None
    unit: str = ""
    status: str = "ok"  # ok | pending | skipped | error
    note: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def pending(benchmark: str, note: str) -> Row:
    """A hook for a benchmark that another part of the project still has to provide: no fake numbers."""
    return Row(benchmark, None, None, None, "-", None, status="pending", note=note)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def table(rows: list[Row], markdown: bool = False) -> str:
    head = ["benchmark", "ours", "baseline", "ratio", "goal", "met?"]
    body = []
    for r in rows:
        met = {True: "yes", False: "NO", None: r.status if r.status != "ok" else "-"}[r.met]
        body.append([r.benchmark, fmt(r.ours, r.unit), fmt(r.baseline, r.unit),
                     "-" if r.ratio is None else f"{r.ratio:.3f}", r.goal, met])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in body])


def machine() -> dict:
    """Where the numbers were taken: these machines are shared, so the load at the start is recorded too."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "host": socket.gethostname(),
        "cpuModel": model or "unknown",
        "cores": os.cpu_count(),
        "usableCores": usable,
        "memoryGiB": mem_gib,
        "loadAverage": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


class Stopwatch:
    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
