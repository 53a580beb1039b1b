"""Where a stage runs: its resolved plan, the run's manifest, and whether it resumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.manifest import Manifest
from posttrain.plan import StagePlan


@dataclass
class StageContext:
    """What a stage's `preflight` and `main` get besides their recipe.

    Attributes:
        plan: The stage's resolved plan (posttrain.plan).
        manifest: The run's manifest.
        resume: Resume from the last checkpoint of an unfinished attempt of the same plan.
        metrics: Figures recorded by the code a stage's `main` calls (e.g. the EMA's updates),
            written to the manifest with the ones `main` returns.
    """

    plan: StagePlan
    manifest: Manifest
    resume: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> str:
        return self.plan.run

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def stage_dir(self) -> Path:
        """runs/<run>/<name>/"""
        return self.manifest.stage_dir(self.plan.name)

    @property
    def output_dir(self) -> Path:
        """What the stage makes: its model dir, or its dataset dir for a data stage."""
        return Path(self.plan.output["dir"])

    @property
    def init_path(self) -> str | None:
        return self.plan.ref_path("init")

    @property
    def checkpoint_dir(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.stage_dir / "logs.jsonl"
