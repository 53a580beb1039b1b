"""A hand-made `StagePlan` for tests that record stages without running them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.plan import StagePlan


def plan(m, name: str, kind: str | None = None, recipe: dict[str, Any] | None = None,
         init: str | None = None, teacher: str | None = None, output: str = "model",
         run_dir: Path | None = None) -> StagePlan:
    """The plan of stage `name` of manifest `m` (init/teacher: names of its stages, or paths)."""
    refs = {}
    for key, ref in (("init", init), ("teacher", teacher)):
        if ref:
            entry = m.stage(ref)
            refs[key] = ({"from": ref, "path": entry["output_dir"], "stage": ref,
                          "stage_ended": entry.get("ended")} if entry
                         else {"from": ref, "path": ref})
    out_dir = (run_dir or m.stage_dir(name).parent) / name / ("model" if output == "model" else "data")
    return StagePlan(kind=kind or name, name=name, run=m.run, recipe=recipe or {"stage": kind or name},
                     trainer={}, refs=refs, output={"kind": output, "dir": str(out_dir)})
