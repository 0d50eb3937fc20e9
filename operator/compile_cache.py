"""vLLM's compile caches (torch.compile, Inductor, Triton) kept on the run's shared cache claim across iterations.

    python -m selflengthen.operator.compile_cache seed --shared DIR --local DIR
    python -m selflengthen.operator.compile_cache publish --shared DIR --local DIR --health-url URL

Several replicas compiling into one shared directory at once can leave it half-written (each writes the same
entries), so no pod compiles into the claim: the init container `seed` copies the newest complete snapshot from
the claim into the pod's own directory, vLLM compiles (or finds everything) there, and the sidecar `publish` waits
until vLLM is healthy (it compiles before it serves), then, if the compile added files, copies the pod's directory
as a new snapshot (written under a temporary name, then renamed: complete or absent) and points LATEST at it
(replaced atomically: the last publisher wins, always with a complete snapshot). Older snapshots beyond `--keep`
are removed. Both are best effort: a failure only costs a cold compile, so they log and exit 0 (publish then
sleeps, as a sidecar must, until the pod ends).

    <shared>/snapshots/<time>-<pod>/...   one pod's complete cache tree
    <shared>/LATEST                       the name of the newest snapshot
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import time
import urllib.request
import uuid
from pathlib import Path

SEEDED = ".seeded"  # in the pod's directory: the files the seed brought (publish skips a tree with nothing new)
LATEST = "LATEST"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != SEEDED}


def latest(shared: Path) -> Path | None:
    try:
        name = (shared / LATEST).read_text().strip()
    except OSError:
        return None
    snap = shared / "snapshots" / name
    return snap if name and "/" not in name and snap.is_dir() else None


def seed(shared: Path, local: Path) -> int:
    """Copy the newest snapshot into `local`; the number of files copied (0: a cold start)."""
    local.mkdir(parents=True, exist_ok=True)
    snap = latest(shared)
    copied: set[str] = set()
    if snap is not None:
        shutil.copytree(snap, local, dirs_exist_ok=True)
        copied = _files(local)
    (local / SEEDED).write_text("\n".join(sorted(copied)))
    return len(copied)


def publish(shared: Path, local: Path, *, pod: str, keep: int = 2, now: float | None = None) -> str | None:
    """Publish `local` as a snapshot when it holds files the seed did not bring; its name, or None."""
    try:
        seeded = set((local / SEEDED).read_text().splitlines())
    except OSError:
        seeded = set()
    if not (_files(local) - seeded):
        return None
    snapshots = shared / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    name = f"{int(now if now is not None else time.time()):012d}-{pod}"
    tmp = snapshots / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(local, tmp, ignore=shutil.ignore_patterns(SEEDED))
    os.replace(tmp, snapshots / name)
    pointer = shared / f".{LATEST}-{uuid.uuid4().hex[:8]}"
    pointer.write_text(name)
    os.replace(pointer, shared / LATEST)
    current = latest(shared)
    done = sorted(p for p in snapshots.iterdir() if not p.name.startswith("."))
    for old in done[:-keep] if keep > 0 else []:
        if current is None or old.name != current.name:
            shutil.rmtree(old, ignore_errors=True)  # a seed copying it meanwhile falls back to a cold compile
    return name


def wait_healthy(url: str, *, timeout: float, interval: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as rsp:  # noqa: S310 (the pod's own loopback URL)
                if rsp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(interval)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selflengthen.operator.compile_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("seed", "publish"))
    parser.add_argument("--shared", required=True, type=Path, help="the snapshots' directory on the shared claim")
    parser.add_argument("--local", required=True, type=Path, help="the pod's own cache directory")
    parser.add_argument("--health-url", help="publish: vLLM's /health, polled until it answers 200")
    parser.add_argument("--timeout", type=float, default=3600.0, help="publish: seconds to wait for health")
    parser.add_argument("--keep", type=int, default=2, help="publish: snapshots kept")
    args = parser.parse_args(argv)
    if args.command == "seed":
        try:
            n = seed(args.shared, args.local)
            print(f"compile cache: {n} file(s) from {args.shared}" if n else "compile cache: none yet (cold start)")
        except OSError as err:
            print(f"compile cache: not seeded ({err}); vLLM compiles cold", file=sys.stderr)
        return 0
    if not args.health_url:
        parser.error("publish needs --health-url")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if wait_healthy(args.health_url, timeout=args.timeout):
        try:
            name = publish(args.shared, args.local, pod=socket.gethostname())
            print(f"compile cache: published {name}" if name else "compile cache: nothing new to publish")
        except OSError as err:
            print(f"compile cache: not published ({err})", file=sys.stderr)
    while True:  # a sidecar lives as long as its pod
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
