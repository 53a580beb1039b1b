"""Dataset specs → `datasets.Dataset`: synthetic task data, local files, or hub datasets.

A spec is a mapping, one of:
  {task: arithmetic, n: 400, split: train, <difficulty knobs>}   synthetic, deterministic by seed
  {path: data/x.jsonl}                                          local jsonl/json/parquet/csv
  {hub: openai/gsm8k, config: main, split: train}                hub dataset (needs network/cache)
  {stage: rejection}                  the dataset a data stage of the same run wrote (resolved
                                      through the manifest by `resolve_stage_data`)
Task rows have the columns task, prompt, answer, trace, meta (meta is a JSON string).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from posttrain import answer_format as fmt
from posttrain.errors import UserError
from posttrain.tasks import TASKS
from posttrain.tasks.base import load_meta

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SPEC_KEYS = {"task", "path", "hub"}


def resolve_stage_data(recipe: Any, manifest: Any) -> tuple[Any, list[dict[str, Any]]]:
    """A copy of `recipe` with every `{stage: NAME}` spec in its dataset lists turned into that
    stage's file, and one record per resolved spec (for the plan's references).

    The stage must be done in the run and have written a dataset (`train.jsonl` in its output
    dir, as rejection sampling does); the spec keeps `from_stage: NAME` and when that stage
    ended, so a rerun of the data stage (new data at the same path) changes this stage's plan.
    """
    records, changes = [], {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if not isinstance(value, list) or not any(isinstance(s, dict) and "stage" in s
                                                  for s in value):
            continue
        resolved = []
        for i, spec in enumerate(value):
            if isinstance(spec, dict) and "stage" in spec:
                data = manifest.resolve(str(spec["stage"])) / "train.jsonl"
                if not data.is_file():
                    raise UserError(f"{f.name}[{i}]: stage {spec['stage']!r} wrote no dataset "
                                    f"({data} missing); use a data stage such as rejection")
                rest = {k: v for k, v in spec.items() if k != "stage"}
                ended = manifest.stage(str(spec["stage"])).get("ended")
                spec = {"path": str(data), "from_stage": spec["stage"], "stage_ended": ended,
                        **rest}
                records.append({"field": f"{f.name}[{i}]", "stage": spec["from_stage"],
                                "path": str(data), "stage_ended": ended})
            resolved.append(spec)
        changes[f.name] = resolved
    return (dataclasses.replace(recipe, **changes) if changes else recipe), records


def check_spec(spec: Any, where: str) -> None:
    """UserError unless `spec` is a well-formed dataset spec (file presence included)."""
    if isinstance(spec, dict) and "stage" in spec:
        raise UserError(f"{where}: {{stage: {spec['stage']}}} names a stage's dataset; it is "
                        f"resolved only when a stage of a run loads it")
    if not isinstance(spec, dict) or len(_SPEC_KEYS & spec.keys()) != 1:
        raise UserError(f"{where}: each dataset spec needs exactly one of task:, path: or hub:,"
                        f" got {spec!r}")
    if "task" in spec:
        if spec["task"] not in TASKS:
            raise UserError(f"{where}: unknown task {spec['task']!r}; known: {', '.join(TASKS)}")
        n = spec.get("n", 0)
        if not isinstance(n, int) or n <= 0:
            raise UserError(f"{where}: task spec needs n: a positive integer, got {n!r}")
        if spec.get("split", "train") not in ("train", "test"):
            raise UserError(f"{where}: split must be train or test, got {spec.get('split')!r}")
        # One example now: a typo'd or out-of-range knob fails here, not after the stage started.
        knobs = {k: v for k, v in spec.items() if k not in ("task", "n", "split", "seed")}
        try:
            TASKS[spec["task"]].generate(spec.get("split", "train"), 1, max_misses=100, **knobs)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: bad difficulty setting for task {spec['task']!r} "
                            f"({str(e).splitlines()[0]})") from None
    elif "path" in spec:
        path = Path(spec["path"])
        if not path.exists():
            raise UserError(f"{where}: dataset file {path} not found")
        if path.is_file() and path.suffix not in _FILE_BUILDERS:
            raise UserError(f"{where}: {path}: unsupported file type; use "
                            + ", ".join(_FILE_BUILDERS))


def task_rows(spec: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Rows of a synthetic task spec."""
    knobs = {k: v for k, v in spec.items() if k not in ("task", "n", "split", "seed")}
    task = TASKS[spec["task"]]
    try:
        examples = task.generate(spec.get("split", "train"), spec["n"],
                                 seed=spec.get("seed", seed), **knobs)
    except TypeError as e:
        raise UserError(f"task {spec['task']!r}: bad difficulty setting ({e})") from None
    return [ex.to_row() for ex in examples]


def load_source(spec: dict[str, Any], seed: int = 0, where: str = "dataset"):
    """One spec as a `datasets.Dataset`."""
    import datasets

    check_spec(spec, where)
    if "task" in spec:
        rows = task_rows(spec, seed)
        if not rows:
            raise UserError(f"{where}: task spec {spec!r} produced no examples")
        return datasets.Dataset.from_list(rows)
    try:
        if "path" in spec:
            path = Path(spec["path"])
            files = sorted(p for p in path.rglob("*") if p.suffix in _FILE_BUILDERS) \
                if path.is_dir() else [path]
            if not files:
                raise UserError(f"{where}: no data files under {path}")
            builder = _FILE_BUILDERS[files[0].suffix]
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        else:
            ds = datasets.load_dataset(spec["hub"], spec.get("config"),
                                       split=spec.get("split", "train"))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{where}: cannot load {spec}: {msg}") from None
    if len(ds) == 0:
        raise UserError(f"{where}: dataset {spec} is empty")
    if spec.get("n"):
        ds = ds.shuffle(seed=seed).select(range(min(spec["n"], len(ds))))
    return ds


def load_sources(specs: list[dict[str, Any]], seed: int, where: str):
    """Several specs concatenated (columns must agree)."""
    import datasets

    if not specs:
        raise UserError(f"{where}: no dataset given")
    parts = [load_source(s, seed, f"{where}[{i}]") for i, s in enumerate(specs)]
    try:
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    except ValueError as e:
        raise UserError(f"{where}: datasets have different columns ({e})") from None


def require_columns(ds, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(f"{where}: dataset is missing column(s) {', '.join(missing)} "
                        f"(has: {', '.join(ds.column_names)})")


def prompt_messages(prompt: str, system_prompt: str | None,
                    answer_format: str = "tags") -> list[dict[str, str]]:
    """The chat prompt for a question: the system turn (if any), then the user turn the answer
    format asks for (R1's instruction after the question for `boxed`)."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": fmt.user_turn(prompt, answer_format)}]


def to_sft(ds, system_prompt: str | None, answer_format: str = "tags", where: str = "train_data"):
    """Rows with a `messages` column: task rows become prompt + CoT assistant turn (a row whose
    trace calls tools, `meta.tool_calls`, a tool-calling conversation).

    Chat datasets are kept as they are, except that in the `boxed` and `code` formats the last
    user turn gets the format's instruction (as in every RL, sampling and eval prompt), so the
    model trains on the prompts it will see.
    """
    if "messages" in ds.column_names:
        ds = ds.select_columns(["messages"])
        return ds.map(lambda row: {"messages": instruct(row["messages"], answer_format)}) \
            if answer_format != "tags" else ds
    if {"prompt", "trace", "answer"} <= set(ds.column_names):
        def convert(row):
            calls = load_meta(row["meta"]).get("tool_calls") if row.get("meta") else None
            reply = fmt.tool_turns(row["trace"], row["answer"], calls, answer_format) if calls \
                else [{"role": "assistant",
                       "content": fmt.completion(row["trace"], row["answer"], answer_format)}]
            return {"messages": prompt_messages(row["prompt"], system_prompt, answer_format)
                    + reply}
        return ds.map(convert, remove_columns=ds.column_names)
    require_columns(ds, ["messages"], where)
    return ds


@dataclasses.dataclass
class PromptColumns:
    """Which columns of a prompt dataset hold what: one declaration for stage recipes
    (`stages.sampling.PromptFields`) and eval suite tasks (`evaluate.SuiteTask`), which read
    prompts the same way (`load_prompt_rows`).

    Attributes:
        prompt_column: Column holding the question (renamed to `prompt`), e.g. `problem`.
        answer_column: Column holding the gold answer (renamed to `answer`): bare, LaTeX,
            `\\boxed{}` or a GSM8K solution ending `#### 42`. Without it a `solution` column
            serves.
        tests_column: Code tasks: the column of assert statements the `code` reward and scorer
            run (renamed to `tests`), e.g. MBPP's `test_list`; it may stand for the answer.
        test_imports_column: Code tasks: the column of import lines the tests need (renamed to
            `test_imports`).
        show_tests: Code tasks (`answer_format: code`): how many tests follow the question in
            the prompt, so the model knows the function's name (MBPP's prompt shows 3).
    """

    prompt_column: str = "prompt"
    answer_column: str = "answer"
    tests_column: str = "tests"
    test_imports_column: str = "test_imports"
    show_tests: int = 3


def load_prompt_rows(specs: list[dict[str, Any]], columns: PromptColumns,
                     system_prompt: str | None, seed: int, answer_format: str = "tags",
                     where: str = "prompt_data"):
    """The one way prompts are loaded (stages and eval suites): specs → rows with `prompt` as
    chat messages and the gold columns (`answer`/`solution`, `task`, `meta`, or a code task's
    `tests`/`test_imports`) under their standard names.

    The prompt column must exist; in the `code` answer format the first `show_tests` tests
    follow the question.
    """
    ds = load_sources(specs, seed, where)
    renames = ((columns.prompt_column, "prompt"), (columns.answer_column, "answer"),
               (columns.tests_column, "tests"), (columns.test_imports_column, "test_imports"))
    for column, name in renames:
        if column == name:
            continue
        if column not in ds.column_names:
            if name == "prompt":
                raise UserError(f"{where}: no column {column!r} (prompt_column; has: "
                                f"{', '.join(ds.column_names)})")
            continue
        ds = ds.remove_columns([c for c in (name,) if c in ds.column_names])
        ds = ds.rename_column(column, name)
    show = columns.show_tests
    if answer_format == "code" and "tests" in ds.column_names and show > 0 \
            and getattr(ds.features["prompt"], "dtype", None) == "string":
        ds = ds.map(lambda row: {"prompt": code_problem(row["prompt"], row["tests"], show)})
    return to_prompts(ds, system_prompt, answer_format, where)


def code_problem(problem: str, tests: list[str] | None, show: int) -> str:
    """A code task's question: the problem, then its first `show` tests (MBPP's prompt)."""
    if show <= 0 or not tests:
        return str(problem)
    shown = "\n".join(tests[:show])
    return f"{problem}\nYour code should pass these tests:\n\n{shown}"


def to_prompts(ds, system_prompt: str | None, answer_format: str = "tags",
               where: str = "prompts"):
    """Rows for RL / sampling: `prompt` as chat messages plus the gold columns kept as they are."""
    require_columns(ds, ["prompt"], where)
    if not {"answer", "solution", "tests"} & set(ds.column_names):
        raise UserError(f"{where}: dataset needs an `answer` or `solution` column to verify against"
                        f", or a code task's `tests` (has: {', '.join(ds.column_names)})")
    if getattr(ds.features["prompt"], "dtype", None) == "string":  # plain text, not messages yet
        return ds.map(lambda row: {"prompt": prompt_messages(row["prompt"], system_prompt,
                                                             answer_format)})

    # Chat prompts (e.g. trl-lib sets) get the format's user-turn instruction.
    return ds.map(lambda row: {"prompt": instruct(row["prompt"], answer_format)})


def instruct(messages: list[dict[str, Any]], answer_format: str) -> list[dict[str, Any]]:
    """Chat messages with the answer format's instruction in the last user turn."""
    msgs = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    if last is not None:
        msgs[last]["content"] = fmt.user_turn(msgs[last]["content"], answer_format)
    return msgs
