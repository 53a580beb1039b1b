"""One resolved plan per stage: what will run, decided once, before anything is written.

`build_plan` turns a validated recipe into a frozen `StagePlan`: the recipe's values, the full
trainer settings (the TRL config as it will run, its defaults included, paths aside), every
reference resolved (init model, teacher, `{stage: X}` datasets — each stamped with when its
upstream stage ended) and where the output goes. Then:

- the plan's hash is the skip / resume key, so a re-run upstream stage makes this one run again;
- the manifest stores the plan, and the final model dir and every checkpoint hold it
  (`posttrain_plan.json`), so any checkpoint says exactly how it was made;
- the TRL config is built here, once, with one set of defaults: its own cross-field errors surface
  now, as the one line the user would otherwise meet mid-stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

PLAN_FILE = "posttrain_plan.json"
# Config fields that are not settings: where files go, and what differs from rank to rank.
_NOT_SETTINGS = ("output_dir", "logging_dir", "local_rank")


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Everything a stage will do, resolved; serializable (`to_dict`) and hashable (`sha256`).

    Attributes:
        kind: Stage command (`sft`, `grpo`, ...).
        name: Key of the stage in the run manifest.
        run: Run name.
        recipe: The recipe's values (dataset specs resolved), as the user's fields and TRL keys.
        trainer: The TRL config as it will run, defaults included (no paths); {} for data stages.
        refs: Resolved references: `init`, `teacher` → `{from, path, stage?, stage_ended?}`;
            `data` → the `{stage: X}` specs and the files they resolved to.
        output: `{kind: model | dataset, dir: ...}`.
        args: The built TRL config object (not serialized; None for data stages).
    """

    kind: str
    name: str
    run: str
    recipe: dict[str, Any]
    trainer: dict[str, Any]
    refs: dict[str, Any]
    output: dict[str, str]
    args: Any = dataclasses.field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "args"}

    @property
    def sha256(self) -> str:
        """Hash of what the stage computes (not where it writes: run name and output dir aside)."""
        return plan_sha256(self.to_dict())

    def ref_path(self, name: str) -> str | None:
        """Resolved path (or hub id) of reference `name` (`init`, `teacher`), None if absent."""
        ref = self.refs.get(name)
        return ref["path"] if ref else None

    def write(self, directory: Path) -> Path:
        """Write the plan as `posttrain_plan.json` into `directory` (a model or checkpoint dir)."""
        from posttrain import atomic
        path = Path(directory) / PLAN_FILE
        atomic.write_json(path, self.to_dict())
        return path


def plan_sha256(plan: dict[str, Any]) -> str:
    """The skip / resume key of a plan dict: its content without the run name and output dir, so
    the same work recorded under another run (or a moved runs dir) keys the same."""
    what = {k: v for k, v in plan.items() if k != "run"}
    if isinstance(what.get("output"), dict):
        what["output"] = {k: v for k, v in what["output"].items() if k != "dir"}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    """A config value as JSON would give it back (tuples → lists, odd objects → str)."""
    return json.loads(json.dumps(value, default=str))


def resolve_ref(ref: str, manifest) -> dict[str, Any]:
    """A model reference → `{from, path}`, plus `stage`/`stage_ended` when it is a stage and
    `gguf` (file, sha256, architecture, tensor types) when it is a GGUF file.

    A stage of the run wins over a same-named folder in the working dir (`init_from: sft` means
    the run's `sft`, never `./sft`); then a GGUF file (converted once to an HF dir, cached by its
    hash: posttrain.gguf_import); then an existing path; then, for a bare name, the run's stage
    (which reports that it has not run); else a hub id, which loading checks.
    """
    from posttrain.gguf_import import imported_dir, is_gguf_ref

    expanded = Path(ref).expanduser()
    if manifest.stage(ref) is None and is_gguf_ref(ref):
        path, record = imported_dir(ref)
        return {"from": ref, "path": str(path), "gguf": record}
    if manifest.stage(ref) is not None or ("/" not in ref and not expanded.exists()):
        path = manifest.resolve(ref)  # UserError when missing or unfinished
        return {"from": ref, "path": str(path), "stage": ref,
                "stage_ended": manifest.stage(ref).get("ended")}
    if expanded.exists():
        return {"from": ref, "path": str(expanded)}
    return {"from": ref, "path": ref}


def trainer_args(config_path: str, settings: dict[str, Any], output_dir: Path,
                 user_keys: tuple[str, ...] = ()):
    """The TRL config from `settings`; TRL's own errors as one line naming the culprit key
    (the one of the recipe's `user_keys` that alone, over the defaults, makes it fail)."""
    module, _, attr = config_path.rpartition(".")
    config_cls = getattr(__import__(module, fromlist=[attr]), attr)
    try:
        return config_cls(output_dir=str(output_dir), **settings)
    except (ValueError, TypeError) as e:
        message = str(e).splitlines()[0]
    # TRL's messages often leave out the key ("zigzag is not a valid SchedulerType"): find the
    # setting that alone makes the config fail, so the user knows which line to fix.
    defaults = {k: v for k, v in settings.items() if k not in user_keys}
    culprit = next((k for k in user_keys
                    if _fails(config_cls, output_dir, {**defaults, k: settings[k]})), None)
    where = f" ({culprit}: {settings[culprit]!r})" if culprit else ""
    raise UserError(f"invalid trainer settings{where}: {message}")


def _fails(config_cls: type, output_dir: Path, settings: dict[str, Any]) -> bool:
    try:
        config_cls(output_dir=str(output_dir), **settings)
    except (ValueError, TypeError):
        return True
    return False


def build_plan(kind: str, recipe, run: str, manifest, stage_dir: Path,
               data_refs: list[dict[str, Any]] | None = None) -> StagePlan:
    """Resolve `recipe` against the run: references, trainer config, output. `data_refs`: the
    `{stage: X}` datasets it reads, as `posttrain.data.resolve_stage_data` resolved them."""
    refs: dict[str, Any] = {name: resolve_ref(ref, manifest)
                            for name, ref in recipe.references(manifest).items() if ref}
    if data_refs:
        refs["data"] = data_refs
    output = {"kind": recipe.OUTPUT, "dir": str(stage_dir / recipe.OUTPUT_DIR)}
    args, trainer = None, {}
    if recipe.trainer_config():
        args = trainer_args(recipe.trainer_config(), recipe.trainer_settings(),
                            stage_dir / "checkpoints", tuple(recipe.trainer))
        trainer = {k: v for k, v in _jsonable(args.to_dict()).items() if k not in _NOT_SETTINGS}
    return StagePlan(kind=kind, name=recipe.stage_name, run=run, recipe=_jsonable(recipe.values()),
                     trainer=trainer, refs=refs, output=output, args=args)
