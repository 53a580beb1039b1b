"""The stage registry is the one list: every stage module follows the protocol, and what names
stages elsewhere (the Makefile's targets, the import-layer contracts) is checked against it; every
module of the package sits in an import layer, and the layers hold (`lint-imports`)."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import posttrain
from posttrain.recipe import Recipe, TrainingFields
from posttrain.stages import STAGES, stage_module

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _layer_modules(contract: dict) -> list[list[str]]:
    return [[m.strip() for m in re.split(r"[:|]", layer)] for layer in contract["layers"]]


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(posttrain.__path__, "posttrain."))


@pytest.mark.parametrize("kind", list(STAGES))
def test_every_stage_follows_the_protocol(kind):
    module = stage_module(kind)
    assert issubclass(module.Recipe, Recipe) and module.Recipe.KIND == kind
    assert callable(module.preflight) and callable(module.main)
    if issubclass(module.Recipe, TrainingFields):  # a training stage trains through the skeleton
        assert "run_training" in Path(module.__file__).read_text(), kind


def test_every_module_sits_in_an_import_layer():
    layered = [m for layer in _layer_modules(CONTRACTS[0]) for m in layer]
    loose = [m for m in _modules()
             if not any(m == p or m.startswith(p + ".") for p in layered)]
    assert loose == [], f"add these modules to a layer in pyproject.toml: {loose}"
    stage_layers = [m for layer in _layer_modules(CONTRACTS[1]) for m in layer]
    inner = [m for m in _modules() if m.startswith("posttrain.stages.")]
    assert sorted(set(inner) - set(stage_layers)) == []
    assert set(_layer_modules(CONTRACTS[1])[0]) == set(STAGES.values())  # the stages' own layer


def test_the_makefile_has_a_target_per_stage():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.search(r"^STAGES := (.+)$", makefile, re.M).group(1).split())
    assert targets | {"distill"} == set(STAGES)  # distill has its own target (one per student)
    assert re.search(r"^distill: ", makefile, re.M)


def test_import_layers_hold():
    """`lint-imports` checks the contracts in pyproject.toml (layers, no stage importing
    another, no cycles)."""
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout
