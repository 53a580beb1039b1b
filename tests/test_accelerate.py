"""Multi-process stages through `accelerate launch`: 2 CPU processes (gloo) against 1 process with
the same global batch, rank 0 alone writing run state, and the launcher's own checks.

SFT: same data order, same optimizer, so per-step losses must agree to float rounding (measured
max relative difference ~1e-7; the test allows 1e-5). GRPO: each rank samples its own
completions, so sampled runs cannot agree exactly; with greedy decoding (top_k=1) the prompts,
completions and rewards are the same, so per-step reward and completion length must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import launch
from posttrain.cli import main as cli_main
from posttrain.errors import UserError
from posttrain.manifest import Manifest
from posttrain.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]

SFT_ARGS = ["recipes/tiny/sft.yaml", "--max_steps", "4", "--logging_steps", "1",
            "--save_steps", "1000", "--eval_suite", "null", "--seed", "1",
            "--train_data", "[{task: arithmetic, n: 64, digits: [1, 3]}]"]
GRPO_ARGS = ["recipes/tiny/grpo.yaml", "--max_steps", "2", "--logging_steps", "1",
             "--save_steps", "1000", "--eval_suite", "null", "--num_generations", "2",
             "--max_completion_length", "12", "--dynamic_sampling", "false", "--top_k", "1",
             "--steps_per_generation", "1",  # a generation (and its logged reward) every step
             "--prompt_data", "[{task: arithmetic, n: 16, digits: 1}]",
             # tag_count gives partial credit, so the compared rewards are not all zero
             "--rewards", "{accuracy: 1.0, tag_count: 1.0}"]


def _records(run: str, name: str) -> dict[int, dict]:
    path = Manifest(run).stage_dir(name) / "logs.jsonl"
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def _launch(argv: list[str], via_launcher: bool) -> subprocess.CompletedProcess:
    """Two CPU processes: through `python -m posttrain.launch` (checks the recipe, then execs
    accelerate), or straight through the `accelerate launch` command it builds."""
    env = {**os.environ, "POSTTRAIN_THREADS": "2", "OMP_NUM_THREADS": "1"}
    if via_launcher:
        cmd = [sys.executable, "-m", "posttrain.launch", "ddp", "2", *argv]
    else:
        cmd, env = launch.command("ddp", 2, argv)
        env.update(POSTTRAIN_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_written_once(run: str, name: str, proc: subprocess.CompletedProcess) -> None:
    entry = Manifest(run).stage(name)
    assert entry["status"] == "done" and entry["attempts"] == 1
    assert (Path(entry["output_dir"]) / "config.json").exists()
    assert "(2 processes)" in proc.stderr  # the one begin line, from rank 0
    assert proc.stderr.count(f"stage {name!r} of run") == 1


@pytest.mark.slow
def test_sft_two_processes_match_one(tiny_run):
    proc = _launch(["sft", *SFT_ARGS, "--per_device_train_batch_size", "2", "--name", "sft_ddp",
                    "--run", tiny_run], via_launcher=True)
    _check_written_once(tiny_run, "sft_ddp", proc)
    assert cli_main(["sft", *SFT_ARGS, "--per_device_train_batch_size", "4", "--name", "sft_1p",
                     "--run", tiny_run]) == 0
    two, one = _records(tiny_run, "sft_ddp"), _records(tiny_run, "sft_1p")
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    rel = max(abs(two[s]["loss"] - one[s]["loss"]) / abs(one[s]["loss"]) for s in one)
    print(f"\nsft 2 processes x batch 2 vs 1 process x batch 4: max relative loss diff {rel:.1e}")
    assert rel < 1e-5


@pytest.mark.slow
@pytest.mark.skipif("grpo" not in STAGES, reason="grpo stage not registered")
def test_grpo_two_processes_match_one(tiny_run):
    proc = _launch(["grpo", *GRPO_ARGS, "--per_device_train_batch_size", "2", "--name",
                    "grpo_ddp", "--run", tiny_run], via_launcher=False)
    _check_written_once(tiny_run, "grpo_ddp", proc)
    assert cli_main(["grpo", *GRPO_ARGS, "--per_device_train_batch_size", "4", "--name",
                     "grpo_1p", "--run", tiny_run]) == 0
    two, one = _records(tiny_run, "grpo_ddp"), _records(tiny_run, "grpo_1p")
    assert sorted(two) == sorted(one) == [1, 2]
    assert any(one[s]["reward"] != 0 for s in one)
    for step in one:
        for key in ("reward", "completions/mean_length", "loss"):
            assert two[step][key] == pytest.approx(one[step][key], abs=1e-5), (step, key)
    print(f"\ngrpo 2 processes vs 1 (greedy): rewards {[two[s]['reward'] for s in two]} == "
          f"{[one[s]['reward'] for s in one]}")


@pytest.mark.slow
def test_grpo_refill_on_two_processes(tiny_run):
    """DAPO refill under accelerate: each process refills its own groups, the processes agree on
    the rounds, and the plan records refill as what ran. Accuracy alone on a 40-step model leaves
    most groups all wrong, so steps need further rounds."""
    args = [a for a in GRPO_ARGS]
    args[args.index("--dynamic_sampling") + 1] = "refill"
    args[args.index("--rewards") + 1] = "{accuracy: 1.0}"
    args[args.index("--top_k") + 1] = "0"  # sampled: groups can differ
    proc = _launch(["grpo", *args, "--per_device_train_batch_size", "4", "--temperature", "1.0",
                    "--max_sampling_rounds", "3", "--name", "grpo_refill", "--run", tiny_run],
                   via_launcher=True)
    _check_written_once(tiny_run, "grpo_refill", proc)
    entry = Manifest(tiny_run).stage("grpo_refill")
    assert entry["plan"]["recipe"]["dynamic_sampling"] == "refill"
    steps = [r for r in _records(tiny_run, "grpo_refill").values() if "reward" in r]
    rounds = [r["dynamic_sampling/rounds"] for r in steps]
    assert len(steps) == 2 and all(1 <= x <= 3 for x in rounds) and max(rounds) > 1, rounds
    assert all(r["dynamic_sampling/generated_frac"] >= 1 for r in steps)


@pytest.mark.slow
def test_refill_that_would_split_groups_is_refused_in_every_rank(tiny_run):
    """3 samples per process cannot hold whole groups of 2. `posttrain.launch` already refuses
    that layout (TRL's own check, seen from one process); launched by hand, each rank's preflight
    refuses it in one line and nothing is written."""
    cmd, env = launch.command("ddp", 2, ["grpo", *GRPO_ARGS, "--dynamic_sampling", "refill",
                                         "--per_device_train_batch_size", "3",
                                         "--name", "grpo_split", "--run", tiny_run])
    env.update(POSTTRAIN_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    assert "posttrain: error: dynamic_sampling: refill on 2 processes needs each process's " \
           "share of a generation" in proc.stderr
    assert Manifest(tiny_run).stage("grpo_split") is None


REJECTION_ARGS = ["recipes/tiny/rejection.yaml", "--samples_per_prompt", "4", "--max_new_tokens",
                  "32", "--rollout_batch_size", "8", "--check_steps", "false", "--prompt_data",
                  "[{task: arithmetic, n: 20, digits: 1}]"]


@pytest.mark.slow
def test_rejection_two_processes_write_the_one_process_dataset(teacher_run, tmp_path,
                                                               monkeypatch):
    """Each rank samples its share of the prompts, rank 0 gathers and writes once: the dataset
    equals the one a single process writes (separate rollout caches, so nothing is reused)."""
    monkeypatch.setenv("POSTTRAIN_ROLLOUT_CACHE", str(tmp_path / "cache_2p"))
    proc = _launch(["rejection", *REJECTION_ARGS, "--init_from", "teacher", "--name",
                    "rejection_ddp", "--run", teacher_run], via_launcher=True)
    assert proc.stderr.count("stage 'rejection_ddp' of run") == 1  # rank 0 alone writes
    monkeypatch.setenv("POSTTRAIN_ROLLOUT_CACHE", str(tmp_path / "cache_1p"))
    assert cli_main(["rejection", *REJECTION_ARGS, "--init_from", "teacher", "--name",
                     "rejection_1p", "--run", teacher_run]) == 0
    m = Manifest(teacher_run)
    two, one = (Path(m.stage(n)["output_dir"]) / "train.jsonl"
                for n in ("rejection_ddp", "rejection_1p"))
    assert two.read_text() == one.read_text() and one.read_text().strip()
    assert m.stage("rejection_ddp")["metrics"] == m.stage("rejection_1p")["metrics"]
    assert not list(two.parent.parent.glob("*.tmp"))  # no leftover temp dir of a racing rank


def test_launch_command_line():
    cmd, env = launch.command("ddp", 2, ["sft", "r.yaml", "--run", "x"])
    i = cmd.index("accelerate.commands.launch")
    assert cmd[i + 1:i + 5] == ["--config_file", str(launch.CONFIG_DIR / "ddp.yaml"),
                                "--num_processes", "2"]
    assert cmd[-6:] == ["-m", "posttrain.cli", "sft", "r.yaml", "--run", "x"]
    assert int(env["POSTTRAIN_THREADS"]) >= 1


@pytest.mark.parametrize("config, nproc, message", [
    ("ddpp", 2, "unknown accelerate config 'ddpp'"),
    ("fsdp", 2, "needs CUDA GPUs"),
    ("zero3", 2, "needs CUDA GPUs"),
    ("ddp", -1, "NPROC must be >= 1"),
    ("/nonexistent/acc.yaml", 2, "not found"),
])
def test_launch_refuses(config, nproc, message):
    import torch
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("GPU machine: sharded configs are allowed")
    with pytest.raises(UserError, match=message):
        launch.command(config, nproc, ["sft", "r.yaml"])


def test_launcher_checks_the_recipe_before_starting_processes(capsys):
    assert launch.main(["ddp", "2", "sft", "recipes/tiny/sft.yaml", "--run", "x",
                        "--max_step", "3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("posttrain: error: recipes/tiny/sft.yaml: unknown key 'max_step' for "
                           "stage 'sft'; did you mean 'max_steps'?")


def test_accelerate_configs_parse():
    """Every config under recipes/accelerate/ loads with accelerate's own reader."""
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {p.stem: load_config_from_file(str(p)).distributed_type.value
             for p in sorted(launch.CONFIG_DIR.glob("*.yaml"))}
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED",
                     "zero3": "DEEPSPEED"}
