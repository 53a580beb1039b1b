"""Recipe loading: typed fields, TRL trainer keys, overrides read as YAML, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.cli import main as cli_main
from posttrain.errors import UserError
from posttrain.recipe import build_recipe, load_recipe, parse_override
from posttrain.stages.base import Recipe as BaseRecipe
from posttrain.stages.sft import Recipe as SFTRecipe

SFT_OK = "stage: sft\ninit_from: base\ntrain_data:\n  - {task: arithmetic, n: 8}\n"


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_fields_split_between_recipe_and_trainer(tmp_path):
    path = _write(tmp_path, SFT_OK + "learning_rate: 2e-5\nmax_steps: 7\nlora: true\n")
    r = load_recipe(SFTRecipe, path)
    assert r.init_from == "base" and r.lora is True
    assert r.trainer == {"learning_rate": 2e-5, "max_steps": 7}
    assert isinstance(r.trainer["learning_rate"], float)  # `2e-5` is a float, not a string
    flat = r.values()
    assert flat["learning_rate"] == 2e-5 and flat["train_data"] == [{"task": "arithmetic", "n": 8}]
    assert "trainer" not in flat


@pytest.mark.parametrize("text, value", [
    ("5e-4", 5e-4), ("1E5", 1e5), ("-1e-3", -1e-3), ("0.001", 0.001), ("50", 50), ("true", True),
    ("null", None), ("[1, 2]", [1, 2]), ("cosine", "cosine"), ("e5", "e5"),
    ("{task: arithmetic, n: 5}", {"task": "arithmetic", "n": 5}),
])
def test_override_values_are_typed_as_yaml(text, value):
    assert parse_override(text) == value
    assert type(parse_override(text)) is type(value)


def test_overrides_apply_with_types(tmp_path):
    path = _write(tmp_path, SFT_OK)
    r = load_recipe(SFTRecipe, path, {"learning_rate": "5e-4", "max_steps": "50",
                                      "eval_suite": "null", "lora_r": "8",
                                      "train_data": "[{task: countdown, n: 3}]"})
    assert r.trainer == {"learning_rate": 5e-4, "max_steps": 50}
    assert r.eval_suite is None and r.lora_r == 8
    assert r.train_data == [{"task": "countdown", "n": 3}]


@pytest.mark.parametrize("extra, message", [
    # Unknown keys name the closest valid key, for both own and TRL fields.
    ("learning_rat: 0.1", "unknown key 'learning_rat' for stage 'sft'; did you mean 'learning_rate'"),
    ("init_frm: base", "did you mean 'init_from'"),
    ("gradient_accumulation_step: 2", "did you mean 'gradient_accumulation_steps'"),
    ("zzz: 1", "unknown key 'zzz'"),
    # Wrong types.
    ("max_steps: ten", "max_steps: expected an integer, got str 'ten'"),
    ("max_steps: 1.5", "max_steps: expected an integer"),
    ("lora: 3", "lora: expected true or false, got 3"),
    ("learning_rate: fast", "learning_rate: expected a number"),
    ("seed: true", "seed: expected an integer"),
    ("lora_target_modules: 3", "lora_target_modules: expected"),
    # Bad values.
    ("learning_rate: -1", "learning_rate must be > 0"),
    ("threads: 0", "threads must be >= 1"),
    ("output_dir: /tmp/x", "output_dir is set by the run"),
])
def test_bad_recipe_is_one_line_error(tmp_path, extra, message):
    path = _write(tmp_path, SFT_OK + extra + "\n")
    with pytest.raises(UserError) as e:
        load_recipe(SFTRecipe, path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_wrong_type_for_list_field(tmp_path):
    path = _write(tmp_path, "stage: sft\ninit_from: base\ntrain_data: data.jsonl\n")
    with pytest.raises(UserError, match="train_data: expected a list"):
        load_recipe(SFTRecipe, path)


def test_required_fields(tmp_path):
    path = _write(tmp_path, "stage: sft\ntrain_data:\n  - {task: arithmetic, n: 8}\n")
    with pytest.raises(UserError, match="'init_from' is required for stage 'sft'"):
        load_recipe(SFTRecipe, path)


@pytest.mark.parametrize("text, message", [
    ("stage: base\npretrain_data: []\n", "recipe for stage 'base', not 'sft'"),
    ("init_from: base\n", "missing `stage: sft`"),
    ("", "is empty"),
    ("- a\n- b\n", "a recipe is a mapping"),
    ("stage: sft\ninit_from: [base\n", "malformed YAML at line"),
])
def test_malformed_recipe_files(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        load_recipe(SFTRecipe, _write(tmp_path, text))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(SFTRecipe, tmp_path / "nope.yaml")


def test_build_recipe_checks_stage_validation():
    with pytest.raises(UserError, match="arch must be one of"):
        build_recipe(BaseRecipe, {"stage": "base", "arch": "gpt2",
                                  "pretrain_data": [{"task": "arithmetic", "n": 4}]})


@pytest.mark.parametrize("extra, message", [
    ("learning_rat: 0.1", "did you mean 'learning_rate'"),
    ("max_steps: ten", "expected an integer"),
    ("train_data:\n  - {path: /nonexistent/data.jsonl}", "not found"),
    ("train_data:\n  - {task: sudoku, n: 3}", "unknown task 'sudoku'"),
    ("eval_suite: eval/nope.yaml", "not found"),
])
def test_cli_bad_recipe_exits_2_with_one_line_and_writes_nothing(
        tmp_path, monkeypatch, capsys, extra, message):
    runs = tmp_path / "runs"
    monkeypatch.setenv("POSTTRAIN_RUNS_DIR", str(runs))
    path = _write(tmp_path, SFT_OK.replace("init_from: base", f"init_from: {tmp_path}") + extra)
    assert cli_main(["sft", str(path), "--run", "bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posttrain: error:") and message in err and "\n" not in err
    assert not runs.exists() or not any(runs.rglob("*"))


def test_cli_unfinished_upstream_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSTTRAIN_RUNS_DIR", str(tmp_path / "runs"))
    assert cli_main(["sft", "recipes/tiny/sft.yaml", "--run", "fresh"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stage 'base' has not run in run 'fresh'" in err and "\n" not in err
