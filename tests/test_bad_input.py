"""Bad input across the CLI, table style: each row is a mistake a user makes.

Every row must be answered by ONE line on stderr that names the problem, exit code 2, no
traceback, and nothing written to the run: the manifest is byte-for-byte unchanged and no stage
dir appears. Rows run `posttrain.cli.main([...])` in-process (the real CLI, real tiny models);
a few run as subprocesses to prove no traceback reaches the terminal. Recipe keys given as
`--key value` overrides go through the same checks as the YAML.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from plans import plan

from posttrain.cli import main as cli_main
from posttrain.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
SFT = "stage: sft\ninit_from: base\nname: bad\neval_suite: null\nmax_steps: 1\n"
SFT_DATA = SFT + "train_data:\n  - {task: arithmetic, n: 8}\n"
GRPO = ("stage: grpo\ninit_from: sft\nname: bad\neval_suite: null\nmax_steps: 1\n"
        "rewards: {accuracy: 1.0}\nnum_generations: 2\nper_device_train_batch_size: 4\n"
        "max_completion_length: 8\n")
GRPO_DATA = GRPO + "prompt_data:\n  - {task: arithmetic, n: 8}\n"
DPO = "stage: dpo\ninit_from: sft\nname: bad\neval_suite: null\nmax_steps: 1\n"


@dataclass
class Row:
    """One mistake: the CLI args (`{recipe}`/`{tmp}` filled in), the recipe text, and a fragment
    the one-line error must contain."""

    id: str
    args: list[str]
    expect: str
    recipe: str | None = None
    files: dict[str, str] = field(default_factory=dict)   # extra files under tmp
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None                              # a stage module the row needs


ROWS = [
    # --- command line ---
    Row("unknown command", ["sfft", "x.yaml"], "unknown command 'sfft'"),
    Row("stage without recipe", ["sft", "--run", "tiny"], "required: recipe"),
    Row("override without dashes", ["sft", "{recipe}", "--run", "tiny", "max_steps", "5"],
        "unexpected argument 'max_steps'", SFT_DATA),
    Row("override without value", ["sft", "{recipe}", "--run", "tiny", "--max_steps"],
        "override --max_steps needs a value", SFT_DATA),
    Row("bare --", ["sft", "{recipe}", "--run", "tiny", "--", "5"], "unexpected argument '--'",
        SFT_DATA),
    Row("bad run name", ["sft", "{recipe}", "--run", "../x"], "bad run name", SFT_DATA),
    Row("recipe not found", ["sft", "{tmp}/nope.yaml", "--run", "tiny"], "not found"),
    Row("recipe is a dir", ["sft", "{tmp}", "--run", "tiny"], "not found"),
    # --- recipe file ---
    Row("malformed yaml", ["sft", "{recipe}", "--run", "tiny"], "malformed YAML at line 3",
        "stage: sft\ntrain_data: [unclosed\nmax_steps: 1\n"),
    Row("yaml tab indent", ["sft", "{recipe}", "--run", "tiny"], "malformed YAML",
        "stage: sft\ntrain_data:\n\t- {task: arithmetic}\n"),
    Row("empty recipe", ["sft", "{recipe}", "--run", "tiny"], "is empty", "# nothing\n"),
    Row("recipe is a list", ["sft", "{recipe}", "--run", "tiny"], "a recipe is a mapping",
        "- stage: sft\n"),
    Row("missing stage key", ["sft", "{recipe}", "--run", "tiny"], "missing `stage: sft`",
        "init_from: base\n"),
    Row("recipe of another stage", ["sft", "{recipe}", "--run", "tiny"],
        "recipe for stage 'dpo', not 'sft'", DPO),
    Row("unknown key with suggestion", ["sft", "{recipe}", "--run", "tiny"],
        "unknown key 'max_step' for stage 'sft'; did you mean 'max_steps'?",
        SFT_DATA + "max_step: 3\n"),
    Row("unknown override key", ["sft", "{recipe}", "--run", "tiny", "--learning_rat", "1e-3"],
        "did you mean 'learning_rate'?", SFT_DATA),
    Row("unknown key, no match", ["sft", "{recipe}", "--run", "tiny"], "unknown key 'zzz'",
        SFT_DATA + "zzz: 1\n"),
    Row("non-string key", ["sft", "{recipe}", "--run", "tiny"], "keys must be strings",
        SFT_DATA + "1: x\n"),
    Row("wrong type int", ["sft", "{recipe}", "--run", "tiny"], "max_steps: expected an integer",
        SFT_DATA.replace("max_steps: 1", "max_steps: ten")),
    Row("wrong type override", ["sft", "{recipe}", "--run", "tiny", "--save_steps", "often"],
        "save_steps: expected", SFT_DATA),
    Row("wrong type bool", ["sft", "{recipe}", "--run", "tiny"], "lora: expected true or false",
        SFT_DATA + "lora: maybe\n"),
    Row("wrong type list", ["sft", "{recipe}", "--run", "tiny"], "train_data: expected a list",
        SFT + "train_data: arithmetic\n"),
    Row("negative max_steps", ["sft", "{recipe}", "--run", "tiny", "--max_steps", "-5"],
        "max_steps must be > 0", SFT_DATA),
    Row("zero batch size", ["sft", "{recipe}", "--run", "tiny"],
        "per_device_train_batch_size must be > 0",
        SFT_DATA + "per_device_train_batch_size: 0\n"),
    Row("negative learning rate", ["sft", "{recipe}", "--run", "tiny", "--learning_rate", "-1e-4"],
        "learning_rate must be > 0", SFT_DATA),
    Row("zero lora rank", ["sft", "{recipe}", "--run", "tiny", "--lora_r", "0"],
        "lora_r must be > 0", SFT_DATA),
    Row("zero save_steps", ["sft", "{recipe}", "--run", "tiny", "--save_steps", "0"],
        "save_steps", SFT_DATA),
    Row("zero threads", ["sft", "{recipe}", "--run", "tiny", "--threads", "0"],
        "threads must be >= 1", SFT_DATA),
    Row("output_dir in recipe", ["sft", "{recipe}", "--run", "tiny"], "output_dir is set by the run",
        SFT_DATA + "output_dir: /tmp/x\n"),
    Row("required key missing", ["sft", "{recipe}", "--run", "tiny"],
        "'train_data' is required for stage 'sft'", SFT),
    Row("invalid trainer setting", ["sft", "{recipe}", "--run", "tiny", "--lr_scheduler_type",
                                    "zigzag"], "lr_scheduler_type", SFT_DATA),
    # --- datasets ---
    Row("dataset spec without source", ["sft", "{recipe}", "--run", "tiny"],
        "needs exactly one of task:, path: or hub:", SFT + "train_data:\n  - {n: 8}\n"),
    Row("unknown task", ["sft", "{recipe}", "--run", "tiny"], "unknown task 'algebra'",
        SFT + "train_data:\n  - {task: algebra, n: 8}\n"),
    Row("task n zero", ["sft", "{recipe}", "--run", "tiny"], "positive integer",
        SFT + "train_data:\n  - {task: arithmetic, n: 0}\n"),
    Row("task bad split", ["sft", "{recipe}", "--run", "tiny"], "split must be train or test",
        SFT + "train_data:\n  - {task: arithmetic, n: 8, split: dev}\n"),
    Row("task unknown difficulty knob", ["sft", "{recipe}", "--run", "tiny"], "arithmetic",
        SFT + "train_data:\n  - {task: arithmetic, n: 8, digitz: 3}\n"),
    Row("dataset file missing", ["sft", "{recipe}", "--run", "tiny"],
        "dataset file {tmp}/missing.jsonl not found",
        SFT + "train_data:\n  - {path: {tmp}/missing.jsonl}\n"),
    Row("dataset file type", ["sft", "{recipe}", "--run", "tiny"], "unsupported file type",
        SFT + "train_data:\n  - {path: {tmp}/data.txt}\n", {"data.txt": "hello\n"}),
    Row("dataset missing column", ["sft", "{recipe}", "--run", "tiny"],
        "missing column(s) messages", SFT + "train_data:\n  - {path: {tmp}/text.jsonl}\n",
        {"text.jsonl": '{"text": "a"}\n{"text": "b"}\n'}),
    Row("dataset empty", ["sft", "{recipe}", "--run", "tiny"], "empty",
        SFT + "train_data:\n  - {path: {tmp}/empty.jsonl}\n", {"empty.jsonl": ""}),
    Row("dataset not json", ["sft", "{recipe}", "--run", "tiny"], "cannot load",
        SFT + "train_data:\n  - {path: {tmp}/broken.jsonl}\n", {"broken.jsonl": "{not json\n"}),
    # --- models and lineage ---
    Row("init_from missing stage", ["sft", "{recipe}", "--run", "tiny", "--init_from", "grpo"],
        "stage 'grpo' has not run in run 'tiny'", SFT_DATA),
    Row("init_from unfinished stage", ["sft", "{recipe}", "--run", "tiny", "--init_from", "broken"],
        "stage 'broken' of run 'tiny' is 'failed', not done", SFT_DATA),
    Row("init_from missing dir", ["sft", "{recipe}", "--run", "tiny", "--init_from",
                                  "/nonexistent/model"], "/nonexistent/model", SFT_DATA),
    Row("init_from not a model dir", ["sft", "{recipe}", "--run", "tiny", "--init_from", "{tmp}"],
        "cannot load", SFT_DATA),
    Row("hub id not available offline", ["sft", "{recipe}", "--run", "tiny", "--init_from",
                                         "no-such-org/no-such-model"], "no-such-org/no-such-model",
        SFT_DATA),
    Row("init_from a file that is not GGUF", ["sft", "{recipe}", "--run", "tiny", "--init_from",
                                              "{tmp}/model.gguf"], "is not a GGUF file", SFT_DATA,
        {"model.gguf": "not a checkpoint\n"}),
    Row("init_from a missing GGUF file", ["sft", "{recipe}", "--run", "tiny", "--init_from",
                                          "{tmp}/nope.gguf"], "GGUF file {tmp}/nope.gguf not found",
        SFT_DATA),
    Row("init_from a package that is not installed", ["sft", "{recipe}", "--run", "tiny",
                                                      "--init_from", "pkg:no_such_pkg/m.gguf"],
        "package 'no_such_pkg' is not installed", SFT_DATA),
    Row("chat_template neither a name nor Jinja", ["sft", "{recipe}", "--run", "tiny",
                                                   "--chat_template", "chatml"],
        "neither a named template", SFT_DATA),
    # --- eval suites ---
    Row("eval suite missing", ["sft", "{recipe}", "--run", "tiny", "--eval_suite",
                               "eval/nope.yaml"], "eval/nope.yaml not found", SFT_DATA),
    Row("eval suite unknown task", ["sft", "{recipe}", "--run", "tiny", "--eval_suite",
                                    "{tmp}/suite.yaml"], "unknown task 'algebra'", SFT_DATA,
        {"suite.yaml": "tasks:\n  - {name: a, task: algebra}\n"}),
    Row("eval suite k > n", ["sft", "{recipe}", "--run", "tiny", "--eval_suite",
                             "{tmp}/suite.yaml"], "k=8", SFT_DATA,
        {"suite.yaml": "n: 2\nk: 8\ntasks:\n  - {name: a, task: arithmetic}\n"}),
    Row("eval command unknown stage", ["eval", "--run", "tiny", "--stage", "nope"],
        "stage 'nope' has not run"),
    Row("status of missing run", ["status", "--run", "no_such_run"], "has no manifest"),
    # --- run state / disk ---
    Row("corrupt manifest", ["sft", "{recipe}", "--run", "corrupt"], "is not valid JSON",
        SFT_DATA),
    Row("output dir not writable", ["sft", "{recipe}", "--run", "tiny", "--init_from",
                                    "{base}"], "cannot write", SFT_DATA,
        env={"POSTTRAIN_RUNS_DIR": "{world}/afile/runs"}),
    Row("disk too full", ["sft", "{recipe}", "--run", "tiny"], "MiB free", SFT_DATA,
        env={"POSTTRAIN_MIN_FREE_MB": str(1 << 40)}),
    # --- fp8 ---
    Row("fp8 on a model without eligible layers", ["sft", "{recipe}", "--run", "tiny",
                                                   "--fp8", "true", "--init_from", "{world}/gpt2"],
        "no layer of", SFT_DATA),
    # --- GRPO ---
    Row("grpo unknown reward", ["grpo", "{recipe}", "--run", "tiny"], "accuracyy",
        GRPO_DATA.replace("accuracy: 1.0", "accuracyy: 1.0"), needs="grpo"),
    Row("grpo batch not divisible", ["grpo", "{recipe}", "--run", "tiny",
                                     "--per_device_train_batch_size", "5", "--num_generations",
                                     "2"], "divisible by num_generations", GRPO_DATA,
        needs="grpo"),
    Row("grpo one generation", ["grpo", "{recipe}", "--run", "tiny", "--num_generations", "1"],
        "at least 2 generations per prompt", GRPO_DATA, needs="grpo"),
    Row("grpo negative beta", ["grpo", "{recipe}", "--run", "tiny", "--beta", "-0.1"],
        "beta must be >= 0", GRPO_DATA, needs="grpo"),
    Row("grpo negative correction threshold", ["grpo", "{recipe}", "--run", "tiny",
                                                "--drop_is_correction_below", "-1"],
        "drop_is_correction_below must be > 0", GRPO_DATA, needs="grpo"),
    Row("grpo prompts without answers", ["grpo", "{recipe}", "--run", "tiny"], "answer",
        GRPO + "prompt_data:\n  - {path: {tmp}/prompts.jsonl}\n",
        {"prompts.jsonl": '{"prompt": "1+1"}\n'}, needs="grpo"),
    Row("grpo unknown tool", ["grpo", "{recipe}", "--run", "tiny", "--tools", "[bash]"],
        "unknown tool 'bash'", GRPO_DATA, needs="grpo"),
    Row("grpo tools on a template without tool turns", ["grpo", "{recipe}", "--run", "tiny",
                                                        "--tools", "[python]",
                                                        "--chat_template", "r1_zero"],
        "cannot express tool calls", GRPO_DATA, needs="grpo"),
    Row("grpo vllm not installed", ["grpo", "{recipe}", "--run", "tiny", "--use_vllm", "true"],
        "vLLM", GRPO_DATA, needs="grpo"),
    # --- DPO ---
    Row("dpo one sample per prompt", ["dpo", "{recipe}", "--run", "tiny"],
        "samples_per_prompt must be >= 2",
        DPO + "prompt_data:\n  - {task: arithmetic, n: 8}\nsamples_per_prompt: 1\n", needs="dpo"),
]


def _fill(text: str, tmp_row: Path, world) -> str:
    """`{tmp}`: the row's own dir; `{world}`: the shared fixture dir; `{base}`: the base model."""
    tmp, base = world
    return text.replace("{tmp}", str(tmp_row)).replace("{world}", str(tmp)).replace("{base}", base)


def _snapshot(run_dir: Path) -> tuple[bytes, list[str]]:
    """The manifest's bytes and every path under the run: what a failed start must not change."""
    manifest = run_dir / "manifest.json"
    return (manifest.read_bytes() if manifest.exists() else b"",
            sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if run_dir.exists()
            else [])


@pytest.fixture(scope="module")
def world(tiny_run, runs_root, tmp_path_factory):
    """The tiny run plus the odd things some rows need: a failed stage, a corrupt run, a model
    without FP8-capable layers, a file where a dir should be."""
    from posttrain.manifest import Manifest

    tmp = tmp_path_factory.mktemp("bad_input")
    m = Manifest(tiny_run)
    if "broken" not in m.stages:
        m.begin(plan(m, "broken", "sft", recipe={}, init="base"))
        m.fail("broken", "RuntimeError: for the bad-input table")
    base = str(m.resolve("base"))
    (tmp / "afile").write_text("a file, not a dir\n")
    # GPT-2 keeps its projections in Conv1D layers, which FP8 training does not handle.
    from transformers import AutoModelForCausalLM, GPT2Config
    gpt2 = tmp / "gpt2"
    shutil.copytree(base, gpt2, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    AutoModelForCausalLM.from_config(GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=512, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)).save_pretrained(gpt2)
    (runs_root / "corrupt").mkdir(exist_ok=True)
    (runs_root / "corrupt" / "manifest.json").write_text("{half a manifest")
    return tmp, base


def _run_row(row: Row, world, runs_root: Path, capsys, monkeypatch, tmp_row: Path) -> str:
    for name, text in row.files.items():
        (tmp_row / name).write_text(_fill(text, tmp_row, world))
    args = [_fill(a.replace("{recipe}", str(tmp_row / "recipe.yaml")), tmp_row, world)
            for a in row.args]
    if row.recipe is not None:
        (tmp_row / "recipe.yaml").write_text(_fill(row.recipe, tmp_row, world))
    for key, value in row.env.items():
        monkeypatch.setenv(key, _fill(value, tmp_row, world))
    if row.id == "grpo vllm not installed":  # as on a machine without vLLM: `import vllm` fails
        monkeypatch.setitem(sys.modules, "vllm", None)
    runs = [runs_root / r for r in ("tiny", "corrupt")]
    before = [_snapshot(r) for r in runs]
    capsys.readouterr()
    code = cli_main(args)
    out, err = capsys.readouterr()
    assert code == 2, f"{row.id}: exit {code}, stderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"{row.id}: expected one line, got: {err[-400:]!r}"
    assert lines[0].startswith("posttrain: error: ") and "Traceback" not in err
    expect = _fill(row.expect, tmp_row, world)
    assert expect in lines[0], f"{row.id}: {expect!r} not in {lines[0]!r}"
    assert [_snapshot(r) for r in runs] == before, f"{row.id}: the run was written to"
    return lines[0]


MESSAGES: dict[str, str] = {}  # row id → the line it got, for the uniqueness check below


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, world, runs_root, capsys, monkeypatch, tmp_path):
    """One mistake: one line on stderr naming it, exit 2, the run untouched."""
    if row.needs and row.needs not in STAGES:
        pytest.skip(f"no {row.needs} stage in this checkout")
    MESSAGES[row.id] = _run_row(row, world, runs_root, capsys, monkeypatch, tmp_path)


def test_no_two_mistakes_share_a_message():
    """Runs after the table: different mistakes must read differently."""
    if len(MESSAGES) < len(ROWS):
        pytest.skip("only part of the table ran (e.g. -k)")
    by_message: dict[str, list[str]] = {}
    for row_id, line in MESSAGES.items():
        by_message.setdefault(line, []).append(row_id)
    assert [ids for ids in by_message.values() if len(ids) > 1] == []


@pytest.mark.slow
def test_bad_input_in_a_real_process_has_no_traceback(world, runs_root, tmp_path):
    """The console script path: stderr is one line and exit code 2, for a mistake found while
    reading the YAML and one found by the stage's preflight (after torch/TRL are imported)."""
    cases = {
        "malformed": "stage: sft\ntrain_data: [unclosed\n",
        "missing_file": SFT + "train_data:\n  - {path: /nonexistent/data.jsonl}\n",
    }
    env = {**os.environ, "POSTTRAIN_RUNS_DIR": str(runs_root), "POSTTRAIN_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, text in cases.items():  # started together: the imports dominate, not the check
        (tmp_path / f"{name}.yaml").write_text(text)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "posttrain.cli", "sft", str(tmp_path / f"{name}.yaml"),
             "--run", "tiny"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("posttrain: error: "), (name, err)
        assert "Traceback" not in err + out
