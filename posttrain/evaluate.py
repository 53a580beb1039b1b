"""Eval suites → metrics (pass@1 over n with its standard error, unbiased pass@k, maj@k and
cons@n by mathematical equivalence, format rate, length, unscorable prompts).

A suite YAML lists tasks and the sampling to evaluate them with (n samples per prompt,
temperature, max new tokens). Synthetic tasks are generated from their test split; benchmarks
load from a local file (`path:`, under the suite's `data_dir` or $POSTTRAIN_DATA_DIR) when it
exists, else by their hub dataset name. Results go into the
manifest at `stages.<stage>.eval.<suite>.<task>` and, with every sample, under
`runs/<run>/eval/<stage>/`.

Run: `posttrain eval --run demo --stage sft [--suite eval/tiny.yaml]`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain import answer_format as fmt
from posttrain.data import PromptColumns, check_spec, load_prompt_rows
from posttrain.errors import UserError
from posttrain.recipe import check_template, read_yaml
from posttrain.rewards.code import code as code_reward
from posttrain.rollout import Sampling, generate
from posttrain.scoring import answers_equal, extract_answer, score

SCORERS = ("answer", "code")


@dataclass(kw_only=True)
class SuiteTask(PromptColumns):
    """One task of a suite. Its column fields are `posttrain.data.PromptColumns`'s, the same
    names and defaults a stage recipe reads prompts with.

    Attributes:
        name: Key under the suite in the manifest.
        task: Synthetic task name (test split is used), or null for a benchmark.
        path: Local benchmark file (jsonl/parquet); preferred over `hub` when it exists. A
            relative path is read under $POSTTRAIN_DATA_DIR, else the suite's `data_dir`.
        hub: Hub dataset name, e.g. `openai/gsm8k`.
        config: Hub dataset config, e.g. `main`.
        split: Hub split.
        n_prompts: How many prompts to evaluate (null: all; the first ones of a benchmark).
        difficulty: Knobs passed to a synthetic task's generator.
        scorer: `answer` (the final answer against the answer column) or `code` (the final
            Python block run against the row's tests in the sandbox; correct = every test
            passes).
        max_new_tokens: This task's generation cap (null: the suite's).
    """

    name: str
    task: str | None = None
    path: str | None = None
    hub: str | None = None
    config: str | None = None
    split: str = "test"
    n_prompts: int | None = None
    difficulty: dict[str, Any] = field(default_factory=dict)
    scorer: str = "answer"
    max_new_tokens: int | None = None


@dataclass
class Suite:
    """Sampling settings and tasks of an eval suite (`eval/*.yaml`).

    `data_dir` is where relative task `path`s live (a local copy of the benchmarks); the
    environment variable POSTTRAIN_DATA_DIR overrides it, so one suite file serves every machine.
    `answer_format` (tags / boxed, posttrain.answer_format) decides the prompt and what the
    format rate counts; `system_prompt: auto` is that format's system turn. `protocol: r1` is
    DeepSeek-R1's evaluation: temperature 0.6, top-p 0.95 unless the suite sets them, n samples
    per prompt, pass@1 as their mean with its standard error, and cons@n (majority of all n).
    """

    name: str
    tasks: list[SuiteTask]
    data_dir: str | None = None
    n: int = 4
    k: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 64
    seed: int = 1234
    answer_format: str = "tags"
    system_prompt: str | None = "auto"
    protocol: str | None = None  # r1: DeepSeek-R1's sampling and figures (see above)
    chat_template: str | None = None  # as a recipe's: null = the model's own (R1-Zero's if none)
    tools: list[str] = field(default_factory=list)  # tools the model may call (posttrain.tools)
    max_tool_calls: int = 4  # tool calls per sample
    backend: str = "auto"  # rollout backend: auto (vLLM on GPU where it can run), hf, vllm
    cache: bool = True     # reuse samples cached on disk for the same model, prompt and sampling


def load_suite(path: str | Path) -> Suite:
    """Parse and check a suite YAML; UserError on any mistake."""
    data = read_yaml(path)
    tasks = data.pop("tasks", None)
    if not isinstance(tasks, list) or not tasks:
        raise UserError(f"{path}: a suite needs `tasks:`, a non-empty list")
    data.setdefault("name", Path(path).stem)
    if data.get("protocol") == "r1":
        data.setdefault("temperature", 0.6)
        data.setdefault("top_p", 0.95)
    elif data.get("protocol") is not None:
        raise UserError(f"{path}: protocol must be r1 or null, got {data['protocol']!r}")
    unknown = set(data) - set(Suite.__dataclass_fields__)
    if unknown:
        raise UserError(f"{path}: unknown suite key(s) {', '.join(sorted(unknown))}")
    parsed = []
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or "name" not in t:
            raise UserError(f"{path}: tasks[{i}] needs a name")
        known = set(SuiteTask.__dataclass_fields__)
        knobs = {k: v for k, v in t.items() if k not in known}
        st = SuiteTask(**{k: v for k, v in t.items() if k in known},
                       difficulty={**t.get("difficulty", {}), **knobs})
        if st.task is None and st.path is None and st.hub is None:
            raise UserError(f"{path}: task {st.name!r} needs task:, path: or hub:")
        if st.task is not None:  # name and knobs checked now, not after a stage has trained
            check_spec({"task": st.task, "n": 1, **st.difficulty}, f"{path}: task {st.name!r}")
        if st.task is None and knobs:  # a benchmark has no knobs: a typo must not pass silently
            raise UserError(f"{path}: task {st.name!r}: unknown key(s) {', '.join(sorted(knobs))}")
        if st.scorer not in SCORERS:
            raise UserError(f"{path}: task {st.name!r}: scorer must be one of "
                            f"{', '.join(SCORERS)}, got {st.scorer!r}")
        if st.scorer == "code" and st.task is not None:
            raise UserError(f"{path}: task {st.name!r}: the code scorer needs a benchmark with "
                            "tests (path: or hub:), not a synthetic task")
        parsed.append(st)
    suite = Suite(tasks=parsed, **data)
    fmt.check(suite.answer_format, f"{path}: answer_format")
    check_template(suite.chat_template, f"{path}: chat_template")
    from posttrain.tools import check_tools
    check_tools(suite.tools, f"{path}: tools")
    if suite.system_prompt == "auto":
        suite.system_prompt = fmt.default_system_prompt(suite.answer_format)
    if suite.n < 1 or suite.k < 1:
        raise UserError(f"{path}: n and k must be >= 1")
    if suite.k > suite.n:
        raise UserError(f"{path}: k={suite.k} needs at least k samples per prompt (n={suite.n})")
    from posttrain.rollout import BACKENDS
    if suite.backend not in BACKENDS:
        raise UserError(f"{path}: backend must be one of {', '.join(BACKENDS)}, got {suite.backend!r}")
    return suite


def local_path(st: SuiteTask, suite: Suite) -> Path | None:
    """Where a benchmark task's local file would be ($POSTTRAIN_DATA_DIR over `data_dir`)."""
    if st.path is None:
        return None
    path = Path(st.path).expanduser()
    root = os.environ.get("POSTTRAIN_DATA_DIR") or suite.data_dir
    return path if path.is_absolute() or not root else Path(root).expanduser() / path


def task_prompts(st: SuiteTask, suite: Suite) -> list[dict[str, Any]]:
    """Rows with `prompt` (chat messages), `gold`, and for synthetic tasks `task` and `meta`
    (code tasks: `tests` and `test_imports`), loaded as a stage loads its prompts."""
    where = f"suite {suite.name}/{st.name}"
    if st.task is not None:
        spec = {"task": st.task, "split": "test", "n": st.n_prompts or 200, **st.difficulty}
    else:
        local = local_path(st, suite)
        if local is not None and local.exists():
            spec = {"path": str(local)}
        elif st.hub is not None:
            spec = {"hub": st.hub, "config": st.config, "split": st.split}
        else:
            raise UserError(f"{where}: {local} not found and no hub: fallback"
                            " (set POSTTRAIN_DATA_DIR to the folder holding it)")
    ds = load_prompt_rows([spec], st, suite.system_prompt, suite.seed, suite.answer_format, where)
    if st.scorer == "code" and "tests" not in ds.column_names:
        raise UserError(f"{where}: no column {st.tests_column!r} of tests for the code scorer "
                        f"(has: {', '.join(ds.column_names)})")
    if st.task is None and st.n_prompts:
        ds = ds.select(range(min(st.n_prompts, len(ds))))
    rows = []
    for r in ds:
        gold = r.get("answer", r.get("solution"))
        rows.append({"prompt": r["prompt"], "gold": None if gold is None else str(gold),
                     "task": r.get("task"), "meta": r.get("meta"),
                     "tests": list(r.get("tests") or []),
                     "test_imports": list(r.get("test_imports") or [])})
    return rows


def score_code(rows: list[dict[str, Any]], outs: list[list[Any]]) -> list[list[float | None]]:
    """Per prompt, per sample: the share of the row's tests its program passes (sandbox)."""
    texts = [c.text for comps in outs for c in comps]
    n = [len(comps) for comps in outs]
    fractions = code_reward(texts, tests=[r["tests"] for r, k in zip(rows, n) for _ in range(k)],
                            test_imports=[r["test_imports"] for r, k in zip(rows, n)
                                          for _ in range(k)],
                            budget_s=3600.0)
    out, i = [], 0
    for k in n:
        out.append(fractions[i:i + k])
        i += k
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """Is the most common answer (answers grouped by mathematical equivalence, so `0.5` and
    `\\frac{1}{2}` vote together; ties: first seen) a correct one?"""
    groups: list[list[int]] = []  # indices of equivalent answers, in order of first appearance
    for i, a in enumerate(answers):
        if a is None:
            continue
        home = next((g for g in groups if answers_equal(answers[g[0]], a)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    if not groups:
        return False
    top = max(groups, key=len)  # max keeps the first of equal sizes
    return bool(correct[top[0]])


def metrics(samples: list[list[dict[str, Any]]], k: int, vote: bool = True) -> dict[str, float]:
    """Aggregate per-prompt samples (each with correct/well_formed/tokens/answer) into figures.
    `vote: false` (programs: no answer to vote on) leaves out maj@k and cons@n.

    A prompt whose gold is unscorable (`correct` None) is counted in `unscorable`, not as wrong;
    the accuracy figures are over the scorable prompts. `pass@1_se` is the standard error of
    pass@1 over prompts; `cons@n` is the majority vote over all n samples.
    """
    n = len(samples[0])
    p1, pk, mk, cons, fmt, toks = [], [], [], [], [], []
    unscorable = 0
    for group in samples:
        fmt.extend(s["well_formed"] for s in group)
        toks.extend(s["tokens"] for s in group)
        if any(s["correct"] is None for s in group):
            unscorable += 1
            continue
        c = sum(bool(s["correct"]) for s in group)
        p1.append(c / n)
        pk.append(pass_at_k(n, c, k))
        if not vote:
            continue
        answers, correct = [s["answer"] for s in group], [bool(s["correct"]) for s in group]
        mk.append(majority_correct(answers[:k], correct[:k]))
        cons.append(majority_correct(answers, correct))
    mean = lambda xs: float(sum(xs) / max(1, len(xs)))  # noqa: E731
    m1 = mean(p1)
    se = math.sqrt(sum((x - m1) ** 2 for x in p1) / (len(p1) - 1) / len(p1)) if len(p1) > 1 else 0.0
    votes = {f"maj@{k}": mean(mk), f"cons@{n}": mean(cons)} if vote else {}
    return {"pass@1": mean(p1), "pass@1_se": se, f"pass@{k}": mean(pk), **votes,
            "format_rate": mean(fmt), "mean_tokens": mean(toks),
            "n_prompts": len(samples), "unscorable": unscorable, "n_samples": n}


def evaluate_model(model_ref: Any, suite: Suite, backend: str | None = None,
                   progress: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, list]]:
    """Figures per task, and every sample (for the JSONL dump). `backend` overrides the suite's."""
    results, dumps = {}, {}
    backend = backend or suite.backend
    for st in suite.tasks:
        sampling = Sampling(n=suite.n, temperature=suite.temperature, top_p=suite.top_p,
                            max_new_tokens=st.max_new_tokens or suite.max_new_tokens,
                            seed=suite.seed, tools=tuple(suite.tools),
                            max_tool_calls=suite.max_tool_calls)
        rows = task_prompts(st, suite)
        outs = generate(model_ref, [r["prompt"] for r in rows], sampling, backend=backend,
                        batch_size=suite.batch_size, progress=progress, cache=suite.cache,
                        tokenizer_options={"chat_template": suite.chat_template,
                                           "answer_format": suite.answer_format})
        code_scores = score_code(rows, outs) if st.scorer == "code" else None
        per_prompt = []
        for i, (row, comps) in enumerate(zip(rows, outs)):
            group = []
            for j, c in enumerate(comps):
                if code_scores is None:
                    ok = score(c.text, row["gold"], row["task"], row["meta"])
                    extra = {"answer": extract_answer(c.text)}
                else:  # a program is right when it passes every test
                    frac = code_scores[i][j]
                    ok = None if frac is None else frac == 1.0
                    extra = {"tests_passed": frac}
                group.append({"text": c.text, **extra,
                              "correct": None if ok is None else bool(ok),
                              "well_formed": fmt.is_well_formed(c.text, suite.answer_format),
                              "tokens": c.tokens, "finish_reason": c.finish_reason,
                              **({"tool_calls": c.tool_calls, "messages": list(c.messages)}
                                 if suite.tools else {})})
            per_prompt.append(group)
        results[st.name] = metrics(per_prompt, suite.k, vote=code_scores is None)
        results[st.name].update(temperature=suite.temperature)
        if suite.tools:  # tool calls per sample, and the share of samples that made one
            calls = [s["tool_calls"] for g in per_prompt for s in g]
            results[st.name].update(tool_calls=sum(calls) / len(calls),
                                    tool_use_rate=sum(c > 0 for c in calls) / len(calls))
        dumps[st.name] = [{"prompt": r["prompt"][-1]["content"], "gold": r["gold"], "samples": g}
                          for r, g in zip(rows, per_prompt)]
    return results, dumps


def write_eval(run_dir: Path, stage: str, suite: Suite, results: dict, dumps: dict) -> Path:
    """Summary JSON and per-sample JSONL under runs/<run>/eval/<stage>/."""
    from posttrain import atomic
    out = run_dir / "eval" / stage
    atomic.write_json(out / f"{suite.name}.json", results)
    for task, rows in dumps.items():
        atomic.write_text(out / f"{suite.name}.{task}.samples.jsonl",
                          "".join(json.dumps(r) + "\n" for r in rows))
    return out


def run_eval(manifest, stage: str, suite_path: str | Path, backend: str | None = None,
             weights: str | None = None, progress: bool = True) -> dict[str, dict[str, float]]:
    """Evaluate a finished stage of a run with a suite; store figures in the manifest."""
    model_dir = manifest.resolve(stage)
    if weights:
        model_dir = model_dir / weights
        if not model_dir.exists():
            raise UserError(f"stage {stage!r} has no {weights!r} weights at {model_dir}")
    suite = load_suite(suite_path)
    results, dumps = evaluate_model(str(model_dir), suite, backend=backend, progress=progress)
    key = suite.name if not weights else f"{suite.name}@{weights}"
    write_eval(manifest.run_dir, stage, suite, results, dumps)
    manifest.set_eval(stage, key, results)
    return results


def eval_model(manifest, model_ref: str, suite_path: str | Path, backend: str | None = None,
               progress: bool = True) -> tuple[str, dict[str, dict[str, float]]]:
    """Evaluate a model that is no stage of the run (a base checkpoint, a GGUF file): figures
    and samples under `runs/<run>/eval/<label>/`, the manifest untouched. Returns (label,
    figures)."""
    from posttrain.models import resolve_model_ref
    path = resolve_model_ref(model_ref)
    label = Path(str(model_ref).rstrip("/")).name.removesuffix(".gguf") or "model"
    suite = load_suite(suite_path)
    results, dumps = evaluate_model(path, suite, backend=backend, progress=progress)
    write_eval(manifest.run_dir, label, suite, results, dumps)
    return label, results
