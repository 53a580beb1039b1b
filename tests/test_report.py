"""The run report is built from a manifest and logs.jsonl files alone: no model, no trainer."""

from __future__ import annotations

import json
import re

import pytest
from plans import plan

from posttrain.errors import UserError
from posttrain.manifest import Manifest
from posttrain.report import write_report
from posttrain.tables import eval_table, markdown_table


def _figures(p1: float, fmt: float, tokens: float) -> dict:
    return {"pass@1": p1, "pass@4": min(1.0, p1 + 0.2), "maj@4": p1, "format_rate": fmt,
            "mean_tokens": tokens, "n_prompts": 10, "n_samples": 4, "temperature": 0.7}


def _stage(m: Manifest, name: str, kind: str, init_from: str | None, p1: float, fmt: float,
           tokens: float, logs: list[dict] | None = None, recipe: dict | None = None,
           metrics: dict | None = None) -> None:
    teacher = (recipe or {}).get("teacher")
    m.begin(plan(m, name, kind, recipe=recipe, init=init_from, teacher=teacher))
    m.finish(name, metrics or {"train_loss": 0.5})
    m.set_eval(name, "tiny", {"arithmetic": _figures(p1, fmt, tokens),
                              "countdown": _figures(p1 / 2, fmt, tokens)})
    if logs:
        path = m.stage_dir(name) / "logs.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in logs) + '{"step": 9, "lo')


def _run(tmp_path) -> Manifest:
    m = Manifest("r", root=tmp_path)
    loss = [{"step": s, "loss": 2.0 / s} for s in range(1, 6)]
    _stage(m, "base", "base", None, 0.05, 0.1, 60.0, loss)
    _stage(m, "sft", "sft", "base", 0.40, 0.95, 40.0, loss)
    _stage(m, "grpo", "grpo", "sft", 0.60, 0.97, 38.0,
           [{"step": s, "loss": 0.01, "reward": 0.1 * s, "rewards/accuracy/mean": 0.1 * s,
             "reward_std": 0.3, "completions/mean_length": 40 - s} for s in range(1, 6)])
    _stage(m, "dpo", "dpo", "grpo", 0.61, 0.99, 34.0,
           [{"step": s, "loss": 0.69 - 0.05 * s, "rewards/margins": 0.1 * s,
             "rewards/accuracies": 0.5 + 0.08 * s, "rewards/chosen": 0.05 * s,
             "rewards/rejected": -0.05 * s} for s in range(1, 6)],
           metrics={"train_loss": 0.6, "pairs": 120, "prompts_no_pair": 30,
                    "final_reward_margin": 0.5, "final_preference_accuracy": 0.9})
    _stage(m, "distill_qwen", "distill", "dpo", 0.50, 0.98, 36.0, loss,
           recipe={"stage": "distill", "teacher": "dpo"})
    _stage(m, "student_rl", "grpo", "base", 0.20, 0.80, 50.0)
    return m


def test_report_from_manifest_and_logs(tmp_path):
    m = _run(tmp_path)
    path = write_report("r", root=tmp_path)
    text = path.read_text()
    # The eval table: every stage and task, figures as stored.
    for name in ("base", "sft", "grpo", "dpo", "distill_qwen", "student_rl"):
        assert re.search(rf"\| {name} +\| tiny/arithmetic", text), name
    assert "| 0.610 |" in text and "pass@4" in text and "maj@4" in text
    # Sections with their plots, linked relative to the report and present on disk.
    for section in ("## Eval", "## Loss curves", "## Reward curves", "## DPO",
                    "## Distillation vs RL"):
        assert section in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"plots/loss.png", "plots/grpo_reward.png", "plots/dpo_margins.png",
            "plots/distill_vs_rl.png", "plots/pass_at_1.png"} <= set(links)
    for link in links:
        assert not link.startswith("/") and (m.run_dir / link).stat().st_size > 1000
    # DPO against its init, and the pair statistics.
    dpo = text.split("## DPO", 1)[1].split("##", 1)[0]
    assert "pairs 120" in dpo and "`grpo`" in dpo
    assert re.search(r"\| tiny/arithmetic +\| +0.600 \| +0.610 \| +\+0.010 \| .* -4.0 \|", dpo)
    # The R1 comparison: students, RL-only student and teacher side by side.
    distill = text.split("## Distillation vs RL", 1)[1]
    assert re.search(r"distill_qwen \| student_rl \| dpo \(teacher\)", distill)
    assert re.search(r"\| tiny/arithmetic +\| +0.500 \| +0.200 \| +0.610 \|", distill)


def test_partial_run_still_reports(tmp_path):
    m = Manifest("p", root=tmp_path)
    _stage(m, "base", "base", None, 0.05, 0.1, 60.0)
    m.begin(plan(m, "sft", init="base"))
    m.fail("sft", "RuntimeError: boom")
    text = write_report("p", root=tmp_path).read_text()
    assert "**sft failed**: RuntimeError: boom" in text
    assert "| base " in text and "## DPO" not in text and "## Reward curves" not in text
    assert "## Loss curves" not in text  # no logs at all: no empty plot


def test_report_without_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no manifest"):
        write_report("nothing", root=tmp_path)


def test_tables_read_as_text():
    table = markdown_table(["stage", "pass@1"], [["sft", "0.400"], ["grpo_long_name", "0.600"]])
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # padded: columns line up in a terminal
    assert lines[1].endswith(":|")  # figures right-aligned on GitHub too
    assert eval_table({"x": {"eval": {}}}) == "(no eval figures yet)"
