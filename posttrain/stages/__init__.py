"""The pipeline's stages: one explicit table, and the protocol every stage module follows.

A stage module defines:
- `Recipe`: a dataclass subclass of `posttrain.recipe.Recipe` (plus `TrainingFields` when it
  trains) whose `KIND` is the stage's name in `STAGES`;
- `preflight(recipe, ctx) -> None`: every check of the user's input that needs files or models
  (data columns, tokenizer, rewards), run before anything is written; raises `UserError`;
- `main(recipe, ctx) -> dict`: runs the stage and returns its metrics for the manifest (a
  training stage builds its TRL trainer and hands it to `stages.training.run_training`).

Adding a stage: its module, one line in `STAGES`, its recipe(s) and its tests. The CLI, the
Makefile targets, `posttrain.launch` and the import-layer contracts are derived from this table
or checked against it by tests/test_stages.py.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES: dict[str, str] = {
    "base": "posttrain.stages.base",
    "sft": "posttrain.stages.sft",
    "grpo": "posttrain.stages.grpo",
    "rejection": "posttrain.stages.rejection",
    "dpo": "posttrain.stages.dpo",
    "distill": "posttrain.stages.distill",
}

PROTOCOL = ("Recipe", "preflight", "main")


def stage_module(kind: str) -> ModuleType:
    """The module that runs stage `kind`, checked against the protocol (a developer's error, not
    a user's, if it does not follow it)."""
    module = importlib.import_module(STAGES[kind])
    missing = [name for name in PROTOCOL if not hasattr(module, name)]
    if missing or module.Recipe.KIND != kind:
        raise TypeError(f"{module.__name__} does not follow the stage protocol "
                        f"(missing {missing}, Recipe.KIND {module.Recipe.KIND!r} for {kind!r})")
    return module
