"""Hostile input: the time to refuse any input of at most 1 MiB, by `selflengthen validate` (run configurations)
and `selflengthen operator validate` (manifests), in process.

Inputs: the corpus in tests/hostile/ and generated ones near the size limit (a megabyte scalar in a field that
refuses it, a megabyte of flow mappings, of list items, of keys, nesting at the limit, an alias bomb, a manifest with
a megabyte image name). Ours: the slowest refusal. Baseline: PyYAML's safe_load of the same inputs, the loader the
entry points used before (it only parses: it refuses nothing but syntax errors), measured in the same run.
Goal: every refusal under 1 s.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import yaml

from bench.common import ROOT, Row

CORPUS = ROOT / "tests" / "hostile"
MIB = 1024 * 1024
RUN = "apiVersion: selflengthen.io/v1alpha1\nkind: SelfLengthenRun\nmetadata: {name: demo}\n"


def generated(size: int) -> dict[str, tuple[str, bytes]]:
    """name -> (command, bytes) of inputs just under `size` bytes."""
    def fill(head: bytes, unit: bytes, tail: bytes = b"\n") -> bytes:
        return head + unit * ((size - len(head) - len(tail)) // len(unit)) + tail

    bomb = b'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + b"".join(
        b"%c: &%c [%s]\n" % (98 + i, 98 + i, b",".join([b"*%c" % (97 + i)] * 9)) for i in range(8))
    return {
        "megabyte-name": ("validate", fill(b"name: ", b"x")),
        "megabyte-stop-string": ("validate", fill(b"sampling:\n  stop: ['", b"x", b"']\n")),
        "flow-mappings": ("validate", fill(b"bogus: {", b"k: {a: 1, b: [1, 2]}, ", b"z: 0}\n")),
        "list-items": ("validate", fill(b"sampling:\n  stop:\n", b"  - item\n")),
        "many-keys": ("validate", b"bogus:\n" + b"".join(b"  k%07d: 1\n" % i for i in range((size - 8) // 14))),
        "deep-nesting": ("validate", b"sampling: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
        "alias-bomb": ("validate", bomb),
        "manifest-megabyte-image": ("operator validate", fill((RUN + "spec:\n  image: '").encode(), b"y", b"'\n")),
        "manifest-many-extra-args": ("operator validate", fill(
            (RUN + "spec:\n  image: x\n  storage: {uri: s3://b/p}\n  models: {base: m}\n  inference:\n"
             "    extraArgs:\n").encode(), b"    - --port=9000\n")),
    }


def _refuse(command: str, path: Path) -> tuple[float, int]:
    from selflengthen.cli import main

    sink = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        rc = main([*command.split(), str(path)])
    return time.perf_counter() - start, rc


def _baseline(path: Path) -> float:
    start = time.perf_counter()
    try:
        list(yaml.safe_load_all(path.read_bytes()))
    except Exception:  # noqa: S110 - the old path's crashes (RecursionError, int digits, ...) end it too
        pass
    return time.perf_counter() - start


def run(quick: bool = False, workdir: Path | None = None) -> list[Row]:
    import tempfile

    size = 64 * 1024 if quick else MIB - 1024
    cases = {name: (c["command"], (CORPUS / name).read_bytes())
             for name, c in json.loads((CORPUS / "cases.json").read_text()).items()}
    cases.update(generated(size))
    ours: dict[str, float] = {}
    base: dict[str, float] = {}
    accepted = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        # Warm up both entry points on the examples first: imports and the CRD's validators are built once per
        # process, whatever the input; what is timed is the refusal of each input.
        _refuse("validate", ROOT / "examples" / "local-tiny.yaml")
        _refuse("operator validate", ROOT / "examples" / "run.yaml")
        for name, (command, data) in cases.items():
            path = Path(tmp) / f"{name}.yaml"
            path.write_bytes(data)
            seconds, rc = _refuse(command, path)
            if rc == 0:
                accepted.append(name)
            ours[name] = seconds
            base[name] = _baseline(path)
    slowest = max(ours, key=ours.get)
    worst = ours[slowest]
    base_worst = max(base.values())
    corpus = len(cases) - len(generated(size))
    note = (f"{len(cases)} inputs (the {corpus} of tests/hostile and {len(cases) - corpus} generated up to "
            f"{size // 1024} KiB); slowest refusal: {slowest} ({worst:.3f} s). Baseline: PyYAML safe_load of the "
            "same inputs (parsing only, as the entry points did before: it refuses nothing but syntax errors).")
    if accepted:
        note += f" NOT refused: {', '.join(accepted)}."
    return [Row("hostile input: slowest refusal of any input <= 1 MiB (validate, operator validate) vs safe_load",
                worst, base_worst, base_worst / worst if worst else None, "< 1 s", worst < 1.0 and not accepted,
                unit="s", note=note, details={"ours": ours, "baseline": base, "bytes": size})]
