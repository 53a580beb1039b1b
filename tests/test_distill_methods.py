"""Distillation methods (traces, logits, on_policy): their TRL configs, one-line errors, the
shared-vocabulary check, training through the stage with its budget, the time budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import UserError
from posttrain.recipe import read_yaml

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT.parent / "shared" / "tokenizers"
PROMPTS = "[{task: arithmetic, n: 24, digits: 1}]"  # as test_distill: the teacher's cached samples
STUDENT = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 1, num_key_value_heads: 1}"
SMALL = {"teacher": "teacher", "prompt_data": PROMPTS, "samples_per_prompt": "8",
         "max_new_tokens": "24", "check_steps": "false", "student": "tiny:qwen2",
         "student_config": STUDENT, "max_steps": "3", "per_device_train_batch_size": "4",
         "save_steps": "1000", "eval_suite": "null"}


def _recipe(overrides):
    from posttrain.recipe import load_recipe
    from posttrain.stages.distill import Recipe
    return load_recipe(Recipe, "recipes/tiny/distill_qwen.yaml", overrides)


@pytest.mark.parametrize("overrides, config, settings", [
    ({}, "trl.SFTConfig", {}),
    ({"method": "logits"}, "trl.experimental.gkd.GKDConfig",
     {"lmbda": 0.0, "beta": 0.0, "temperature": 1.0, "seq_kd": False}),
    ({"method": "logits", "beta": "0.5", "kd_temperature": "2.0"},
     "trl.experimental.gkd.GKDConfig", {"beta": 0.5, "temperature": 2.0}),
    ({"method": "on_policy"}, "trl.DistillationConfig",
     {"beta": 1.0, "temperature": 1.0, "max_completion_length": 96}),
    ({"method": "on_policy", "lmbda": "0.5"}, "trl.experimental.gkd.GKDConfig",
     {"lmbda": 0.5, "beta": 1.0, "max_new_tokens": 96}),
])
def test_each_method_builds_its_trl_config(overrides, config, settings):
    from posttrain.plan import trainer_args
    recipe = _recipe(overrides)
    assert recipe.trainer_config() == config
    args = trainer_args(config, recipe.trainer_settings(), Path("/tmp/unused"), ())
    assert type(args).__name__ == config.rpartition(".")[2]
    assert {k: getattr(args, k) for k in settings} == settings
    own = read_yaml("recipes/tiny/distill_qwen.yaml")  # the recipe's own values reach it too
    assert args.max_steps == own["max_steps"]
    assert args.per_device_train_batch_size == own["per_device_train_batch_size"]


@pytest.mark.parametrize("overrides, message", [
    ({"method": "soft"}, "method must be one of traces, logits, on_policy"),
    ({"beta": "0.5"}, "beta (the divergence) is for method logits/on_policy"),
    ({"method": "logits", "lmbda": "0.5"}, "lmbda (the on-policy share) is for method on_policy"),
    ({"method": "on_policy", "beta": "2"}, "beta must be in [0, 1]"),
    ({"method": "on_policy", "kd_temperature": "0"}, "kd_temperature must be > 0"),
    ({"method": "on_policy", "seq_kd": "true"}, "seq_kd: not a field of trl.DistillationConfig"),
    ({"max_completion_length": "8"}, "max_completion_length: not a field of trl.SFTConfig"),
])
def test_method_errors_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        _recipe(overrides)


def _tiny_on(tokenizer_dir: Path, out: Path, arch: str, **config) -> Path:
    """A tiny model around a real tokenizer from ../shared/tokenizers, saved with it."""
    from posttrain.models import build_tiny_model, load_tokenizer
    tok = load_tokenizer(str(tokenizer_dir))
    build_tiny_model(arch, tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=1, num_key_value_heads=1, **config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_and_llama(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny models around the real Qwen2.5 and Llama-3.2 tokenizers (built once: their 128k-152k
    vocabularies make them the slow part)."""
    if not TOKENIZERS.is_dir():
        pytest.skip("needs ../shared/tokenizers")
    root = tmp_path_factory.mktemp("families")
    return (_tiny_on(TOKENIZERS / "qwen2.5-instruct", root / "qwen", "qwen2"),
            _tiny_on(TOKENIZERS / "llama-3.2-instruct", root / "llama", "llama"))


@pytest.mark.parametrize("method", ["logits", "on_policy"])
def test_tokenizer_mismatch_is_one_line_and_writes_nothing(method, qwen_and_llama, tmp_path,
                                                           monkeypatch, capsys):
    from posttrain.cli import main as cli_main
    qwen, llama = qwen_and_llama
    runs = tmp_path / "runs"
    monkeypatch.setenv("POSTTRAIN_RUNS_DIR", str(runs))
    capsys.readouterr()
    code = cli_main(["distill", "recipes/tiny/distill_qwen.yaml", "--run", "mismatch",
                     "--teacher", str(qwen), "--init_from", str(llama), "--student", "null",
                     "--method", method])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "needs one tokenizer for teacher and student" in lines[0]
    assert "use method: traces" in lines[0]
    assert not (runs / "mismatch").exists()


@pytest.mark.skipif(not TOKENIZERS.is_dir(), reason="needs ../shared/tokenizers")
def test_shared_tokenizer_passes_and_a_narrower_student_is_padded(tmp_path):
    from posttrain.models import load_model, load_tokenizer
    from posttrain.stages.distill_methods import check_shared_vocabulary, pad_to_teacher
    tok = load_tokenizer(str(TOKENIZERS / "qwen2.5-instruct"))
    width = len(tok)
    check_shared_vocabulary(tok, tok, width + 128, width, "teacher", "student")  # no error
    with pytest.raises(UserError, match="wider than the teacher's"):
        check_shared_vocabulary(tok, tok, width, width + 128, "teacher", "student")
    student = load_model(str(_tiny_on(TOKENIZERS / "qwen2.5-instruct", tmp_path / "s", "qwen2")))
    before = student.get_output_embeddings().weight.shape[0]
    pad_to_teacher(student, before + 128)
    assert student.get_output_embeddings().weight.shape[0] == before + 128
    assert student.config.vocab_size == before + 128


def test_gkd_divergence_uses_the_recipe_temperature():
    from posttrain.stages.distill_methods import trainer_class
    cls = trainer_class("logits", 1.0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.ones(2, 5, dtype=torch.long)
    losses = []
    for t in (1.0, 2.0):
        trainer = cls.__new__(cls)  # the loss hook only reads the temperature
        trainer.temperature = t
        losses.append(trainer.generalized_jsd_loss(student_logits=student, teacher_logits=teacher,
                                                   labels=labels, beta=0.0))
    base = cls.__mro__[1].generalized_jsd_loss(student, teacher, labels=labels, beta=0.0)
    assert torch.allclose(losses[0], base) and not torch.allclose(losses[0], losses[1])


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("traces", {}), ("logits", {}), ("on_policy", {}), ("on_policy", {"lmbda": "0.5"})])
def test_every_method_trains_a_student_and_records_its_budget(teacher_run, method, extra):
    from posttrain.manifest import Manifest
    from posttrain.models import load_model
    from posttrain.runner import run_stage

    name = f"m_{method}_{len(extra)}"
    entry = run_stage("distill", "recipes/tiny/distill_qwen.yaml", teacher_run,
                      {**SMALL, "name": name, "method": method, **extra}, eval_after=False)
    assert entry["status"] == "done" and entry["metrics"]["method"] == method
    b = entry["metrics"]["budget"]
    assert b["optimizer_steps"] == 3 and b["completions"] == 12
    sampled = method != "on_policy" or extra
    n_samples = entry["metrics"]["teacher_data"]["n_samples"] if sampled else 0
    assert b["teacher_samples"] == n_samples == (24 * 8 if sampled else 0)
    assert b["teacher_scored"] == (0 if method == "traces" else 12)
    assert b["teacher_forward_passes"] == b["teacher_samples"] + b["teacher_scored"]
    assert (b["teacher_generated_tokens"] > 0) == bool(sampled)
    # Pure on-policy generates with the student (DistillationTrainer logs the lengths).
    assert (b["student_generated_tokens"] > 0) == (method == "on_policy" and not extra)
    model = load_model(str(Path(entry["output_dir"])))
    assert model.config.model_type == "qwen2"
    records = [json.loads(line) for line in
               (Manifest(teacher_run).stage_dir(name) / "logs.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)


def test_max_train_seconds_stops_training_and_says_so(tiny_run):
    from posttrain.runner import run_stage
    entry = run_stage("sft", "recipes/tiny/sft.yaml", tiny_run,
                      {"name": "timed", "max_steps": "100000", "max_train_seconds": "2",
                       "save_steps": "100000", "eval_suite": "null"}, eval_after=False)
    assert entry["status"] == "done"
    log = Path(entry["output_dir"]).parent / "logs.jsonl"
    steps = max(json.loads(line).get("step", 0) for line in log.read_text().splitlines())
    assert 0 < steps < 100000


def test_report_shows_what_each_arm_spent():
    from posttrain.report import budget_table, distill_names
    budget = {"optimizer_steps": 200, "completions": 6400, "teacher_forward_passes": 6400,
              "student_generated_tokens": 160000, "teacher_generated_tokens": 0, "wall_s": 50.3}
    init = {"plan": {"refs": {"init": {"stage": "student_base"}}}}
    stages = {"student_base": {"kind": "base"},
              "distill_on_policy_qwen": {"kind": "distill", **init,
                                         "metrics": {"method": "on_policy", "budget": budget}},
              "rl_only_qwen": {"kind": "grpo", **init, "metrics": {"budget": budget}},
              "grpo": {"kind": "grpo", "plan": {"refs": {"init": {"stage": "sft"}}}}}
    students, rl, _ = distill_names(stages)
    assert students == ["distill_on_policy_qwen"] and rl == ["rl_only_qwen"]
    table = budget_table(stages, students + rl).splitlines()
    assert table[0].split("|")[1].strip() == "stage" and len(table) == 4
    assert "on_policy" in table[2] and "rl_only" in table[3] and "6400" in table[3]
