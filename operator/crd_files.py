"""The CRD's checked-in files (crds/ and the chart's crds/), written from the models (operator/crd.py).

    python -m selflengthen.operator crd --write     # regenerate them
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .crd import crd

ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = ROOT / "crds" / "selflengthenrun.yaml"
# The Helm chart installs the same file from its own crds/ (Helm reads CRDs only from inside the chart).
CHART_DIR = ROOT / "charts" / "selflengthen"
CHART_CRD_PATH = CHART_DIR / "crds" / "selflengthenrun.yaml"
CRD_PATHS = (CRD_PATH, CHART_CRD_PATH)


HEADER = ("# Generated from pipeline/config.py (RunConfig) and operator/spec.py by\n"
          "#   python -m selflengthen.operator crd --write\n"
          "# Do not edit by hand: tests/test_crd.py fails when this file and the models differ.\n")


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120, allow_unicode=True)


def write(path: Path = CRD_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path


def stale(paths: tuple[Path, ...] = CRD_PATHS) -> list[Path]:
    """The checked-in copies that differ from the models (missing ones included)."""
    text = render()
    return [p for p in paths if not p.exists() or p.read_text(encoding="utf-8") != text]
