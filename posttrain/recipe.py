"""Typed stage recipes: flat YAML of values, CLI overrides, and one-line validation errors.

A recipe is a flat mapping. Keys that are fields of the stage's dataclass configure posttrain;
keys that are fields of the stage's TRL config (`SFTConfig`, `GRPOConfig`, `DPOConfig`, ... under
TRL's own names) go to the trainer. Anything else is an error naming the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from posttrain import answer_format as formats
from posttrain.errors import UserError


@dataclasses.dataclass
class Recipe:
    """Fields every stage has. Stage recipes subclass this and add their own fields; a stage that
    trains also mixes in `TrainingFields`.

    Attributes:
        stage: Stage kind (`sft`, `grpo`, ...); must match the command that runs it.
        name: Key of this stage in the run manifest (default: `stage`). Lets one run hold two
            stages of a kind, e.g. `sft` and `sft_rs`.
        init_from: Where the model comes from: a finished stage of the same run (`sft`), a local
            model dir, a `.gguf` file or a hub id.
        seed: Seed for data generation, sampling and training.
        threads: torch CPU threads (default: all cores, at most 8).
        eval_suite: Suite YAML run when the stage finishes; null to skip.
        answer_format: `tags` (`<think>…</think><answer>…</answer>`, the tiny world's) or
            `boxed` (R1's: `<think>…</think>` then `\\boxed{}`); it decides the prompt, the
            format rewards, the rejection filter, DPO pairing (posttrain.answer_format).
        system_prompt: System turn put before every prompt; `auto`: the answer format's (the
            tag instruction for `tags`, none for `boxed`, as R1 prompts); null for none.
        chat_template: The chat template prompts are rendered with: null for the model's own
            (a base checkpoint without one gets R1-Zero's prompt, with a notice), `r1_zero`
            (posttrain.templates), or a Jinja template.
    """

    stage: str = ""
    name: str | None = None
    init_from: str | None = None
    seed: int = 42
    threads: int | None = None
    eval_suite: str | None = "eval/tiny.yaml"
    answer_format: str = "tags"
    system_prompt: str | None = "auto"
    chat_template: str | None = None

    # Subclasses set these.
    KIND: ClassVar[str] = ""
    # Fields the stage requires to be set in the YAML (checked after loading).
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    # What the stage makes (`model` or `dataset`) and its dir under runs/<run>/<stage>/.
    OUTPUT: ClassVar[str] = "model"
    OUTPUT_DIR: ClassVar[str] = "model"

    @property
    def stage_name(self) -> str:
        return self.name or self.stage

    def validate(self) -> None:
        """Cross-field checks; raise UserError, change nothing. Subclasses extend."""
        formats.check(self.answer_format)
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        check_template(self.chat_template)

    def derived(self) -> dict[str, Any]:
        """Values that follow from the others (`system_prompt: auto` → the format's prompt):
        `resolved` writes them into a new recipe. Subclasses add theirs."""
        if self.system_prompt == "auto":
            return {"system_prompt": formats.default_system_prompt(self.answer_format)}
        return {}

    def resolved(self) -> Recipe:
        """A copy of this (validated) recipe with every derived value filled in: what runs."""
        return dataclasses.replace(self, **self.derived())

    def values(self) -> dict[str, Any]:
        """The recipe's values: own fields (defaults included), then its TRL keys, flat."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "trainer"}
        out.update(getattr(self, "trainer", {}))
        return out

    def trainer_config(self) -> str | None:
        """The TRL config class this recipe builds; None for a stage that trains nothing."""
        return None

    def tokenizer_options(self) -> dict[str, Any]:
        """How the stage's tokenizers render prompts (`posttrain.models.load_tokenizer`)."""
        return {"chat_template": self.chat_template, "answer_format": self.answer_format}

    def references(self, manifest) -> dict[str, str | None]:
        """Model references to resolve (name → stage, dir or hub id). Subclasses add theirs."""
        return {"init": self.init_from}


@dataclasses.dataclass
class TrainingFields:
    """Fields of a stage that trains a model, mixed into its `Recipe` before the base class.

    TRL keys (fields of the stage's TRL config, under TRL's names) are collected in `trainer`.
    They reach the TRL config by one rule, written in `trainer_settings`: later layers win —
    `TRAINER_BASE` < the stage's `TRAINER_DEFAULTS` < the preset's settings (a GRPO objective, a
    distillation method) < the recipe's own keys < what the stage derives from its own fields
    (GRPO's `reward_weights`). A key of the first three layers the selected config lacks is left
    out (those defaults serve several configs); a recipe key it lacks is an error.

    Attributes:
        fp8: Train the eligible Linear layers and routed experts in DeepSeek-V3-style
            fine-grained FP8 (posttrain.fp8) from FP32 master weights; embeddings, head, routers
            and norms stay as they are. A mapping picks GEMMs, layers kept in high precision and
            an emulated accumulator (`posttrain.fp8.FP8Config`), e.g. `{wgrad: false}`.
        ema: Keep an EMA of the trainable weights in CPU memory and save it to
            `<model_dir>/ema/`, e.g. `{decay: 0.999, every: 1}` (posttrain.ema); null for none.
        moe_balance: DeepSeek-V3 auxiliary-loss-free balancing for MoE models:
            `{gamma: bias update speed, alpha: sequence-wise balance loss weight}`
            (posttrain.moe_balance); null for none.
        max_train_seconds: Stop training after this many seconds of wall time (the model is
            saved as at the end of `max_steps`); null: `max_steps` alone decides. A time budget,
            e.g. to compare an RL arm with distillation at equal wall time.
    """

    fp8: bool | dict[str, Any] = False
    ema: dict[str, Any] | None = None
    moe_balance: dict[str, Any] | None = None
    max_train_seconds: float | None = None
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)

    # Lazily imported TRL config class path, e.g. "trl.SFTConfig": its fields are accepted.
    TRAINER_CONFIG: ClassVar[str] = ""
    # Other configs a recipe may select (`trainer_config()`): their fields are accepted by the
    # parser too, and `validate` checks the keys against the one selected.
    OTHER_TRAINER_CONFIGS: ClassVar[tuple[str, ...]] = ()
    # The stage's defaults for TRL fields (over TRAINER_BASE, under the recipe's own keys).
    TRAINER_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def validate(self) -> None:
        super().validate()  # type: ignore[misc]
        # TRL fields every stage shares; 0 or less is a typo the trainer would accept silently
        # (save_steps: 0 trains without ever checkpointing).
        positive(self, "max_train_seconds", "save_steps", "logging_steps", "eval_steps",
                 "save_total_limit", "gradient_accumulation_steps",
                 "per_device_train_batch_size", "per_device_eval_batch_size", "max_length",
                 "num_train_epochs")
        if self.fp8 is not False:
            from posttrain.fp8 import FP8Config
            FP8Config.parse(self.fp8)
        if self.ema is not None:
            from posttrain.ema import EMAConfig
            EMAConfig.parse(self.ema)
        if self.moe_balance is not None:
            from posttrain.moe_balance import BalanceConfig
            BalanceConfig.parse(self.moe_balance)
        accepted = self.trainer_fields()
        stray = sorted(k for k in self.trainer if k not in accepted)
        if stray:
            raise UserError(f"{', '.join(stray)}: not a field of {self.trainer_config()}, the "
                            f"trainer config this {self.KIND} recipe runs")  # type: ignore[attr-defined]

    def derived(self) -> dict[str, Any]:
        out = super().derived()  # type: ignore[misc]
        if self.fp8 == {}:  # the defaults, spelled as a mapping: on, like `true`
            out["fp8"] = True
        return out

    def trainer_config(self) -> str:
        """The TRL config class this recipe builds (a GRPO objective may pick another)."""
        return self.TRAINER_CONFIG

    def trainer_fields(self) -> set[str]:
        """The keyword fields of that config: what the recipe's TRL keys may name."""
        return {f.name for f in dataclasses.fields(_import(self.trainer_config())) if f.init}

    def preset_settings(self) -> dict[str, Any]:
        """TRL settings a preset picked by the recipe sets (an objective, a method); none here."""
        return {}

    def own_settings(self) -> dict[str, Any]:
        """TRL settings the stage derives from its own fields (the recipe may not set them)."""
        return {}

    def trainer_settings(self) -> dict[str, Any]:
        """The TRL config's keyword arguments, by the rule in the class docstring."""
        import torch

        on_gpu = torch.cuda.is_available()
        accepted = self.trainer_fields()
        base = {**TRAINER_BASE, "seed": self.seed, "use_cpu": not on_gpu, "bf16": on_gpu}  # type: ignore[attr-defined]
        settings = {k: v for layer in (base, self.TRAINER_DEFAULTS, self.preset_settings())
                    for k, v in layer.items() if k in accepted}
        return {**settings, **self.trainer, **self.own_settings()}


# Our defaults for every stage's TRL config (a stage's TRAINER_DEFAULTS and the recipe override).
# Gradient checkpointing is off unless a recipe turns it on, as in transformers (TRL turns it on):
# recomputing activations costs one more forward a step (150 tiny base steps: 35.3 s -> 29.3 s),
# worth paying only where activations do not fit; the full-size recipes turn it on.
TRAINER_BASE: dict[str, Any] = dict(
    report_to="none", logging_steps=5, save_strategy="steps", save_steps=50, save_total_limit=2,
    dataloader_num_workers=0, disable_tqdm=False, logging_first_step=True,
    gradient_checkpointing=False,
)


def check_template(template: str | None, where: str = "chat_template") -> None:
    """UserError unless `template` is null, a named template or Jinja."""
    from posttrain.templates import NAMED
    if template is not None and template not in NAMED and "{{" not in template \
            and "{%" not in template:
        raise UserError(f"{where}: {template!r} is neither a named template "
                        f"({', '.join(NAMED)}) nor a Jinja chat template")


def _import(path: str) -> type:
    module, _, attr = path.rpartition(".")
    return getattr(__import__(module, fromlist=[attr]), attr)


@functools.cache  # resolving a TRL config's type hints takes ~0.2 s each time
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - third-party forward refs we cannot resolve: skip checks
        return {}


def _type_name(tp: Any) -> str:
    """How an error names a type: YAML's words for booleans and mappings, else the type's name."""
    if tp is bool:
        return "true/false"
    if tp is dict or typing.get_origin(tp) is dict:
        return "a mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(key: str, value: Any, tp: Any) -> Any:
    """`value` if it fits annotation `tp` (ints widen to float); UserError otherwise."""
    if tp is Any or tp is None:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(key, value, arg)
            except UserError as e:
                errors.append(e)
        raise UserError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got "
                        f"{type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        return [check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value  # enums and classes we do not model: the trainer config checks them


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `5e-4` as a float as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot, so `learning_rate: 5e-4` (or the override
    `--learning_rate 5e-4`) would arrive as the string '5e-4' and be rejected as not a number.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def parse_override(text: str) -> Any:
    """A `--key value` override, read as YAML so `5`, `1e-4`, `true`, `[1, 2]` get their types."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no object construction
    except yaml.YAMLError:
        return text


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping; UserError with the line on syntax errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        raise UserError(f"{path} is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys to values, got {type(data).__name__}")
    return data


def build_recipe(cls: type[Recipe], data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Typed, validated, resolved recipe from a flat mapping; unknown keys and bad values raise
    UserError."""
    own_hints = _type_hints(cls)
    own = {f.name for f in dataclasses.fields(cls) if f.name != "trainer"}
    trainer_hints: dict[str, Any] = {}
    configs = (cls.TRAINER_CONFIG, *cls.OTHER_TRAINER_CONFIGS) \
        if issubclass(cls, TrainingFields) else ()
    for path in reversed(configs):
        tcls = _import(path)  # the main config last: its types win for a shared field
        trainer_hints.update({f.name: _type_hints(tcls).get(f.name, Any)
                              for f in dataclasses.fields(tcls) if f.init})
    kwargs: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise UserError(f"{source}: keys must be strings, got {key!r}")
        if key in own:
            kwargs[key] = check_type(key, value, own_hints.get(key, Any))
        elif key in trainer_hints:
            if key == "output_dir":
                raise UserError(f"{source}: output_dir is set by the run (runs/<run>/<stage>); remove it")
            trainer[key] = check_type(key, value, trainer_hints[key])
        else:
            close = difflib.get_close_matches(key, sorted(own | set(trainer_hints)), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{source}: unknown key {key!r} for stage {cls.KIND!r}{hint}")
    for key in cls.REQUIRED:
        if kwargs.get(key) in (None, "", []):
            raise UserError(f"{source}: {key!r} is required for stage {cls.KIND!r}")
    recipe = cls(**kwargs, **({"trainer": trainer} if issubclass(cls, TrainingFields) else {}))
    recipe.validate()
    return recipe.resolved()


def load_recipe(cls: type[Recipe], path: str | Path, overrides: dict[str, str] | None = None
                ) -> Recipe:
    """Read a recipe YAML, apply `--key value` overrides, and validate it."""
    data = read_yaml(path)
    stage = data.get("stage")
    if stage != cls.KIND:
        raise UserError(f"{path}: this is a recipe for stage {stage!r}, not {cls.KIND!r}"
                        if stage else f"{path}: missing `stage: {cls.KIND}`")
    for key, text in (overrides or {}).items():
        data[key] = parse_override(text)
    return build_recipe(cls, data, source=str(path))


def positive(recipe: Recipe, *names: str) -> None:
    """UserError unless each named numeric field (own or trainer) is > 0 where set."""
    for name in names:
        value = getattr(recipe, "trainer", {}).get(name, getattr(recipe, name, None))
        if value is not None and not value > 0:
            raise UserError(f"{name} must be > 0, got {value}")
