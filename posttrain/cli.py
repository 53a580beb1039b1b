"""`posttrain <stage> RECIPE.yaml --run NAME [--key value ...]` and the run-level commands.

    posttrain base|sft|... RECIPE --run NAME [--force] [--no-eval] [--key value ...]
    posttrain eval --run NAME --stage STAGE [--suite eval/tiny.yaml] [--weights ema] [--data_dir D]
    posttrain eval --run NAME --model DIR|FILE.gguf|HUB_ID [--suite ...]   a model of no stage
    posttrain import FILE.gguf --out DIR       a GGUF checkpoint as an HF model dir
    posttrain init-model --arch qwen2|llama|deepseek_v3 --tokenizer DIR --out DIR [--key value ...]
    posttrain student --from MODEL --out DIR [--layers every_other|all|spread:N|0,2,4] [--arch llama|qwen2]
                      [--run NAME]      a teacher's layers as a smaller Llama or Qwen2 model
    posttrain status --run NAME
    posttrain fp8 quantize|dequantize SRC DST [--dtype bfloat16|float32]
    posttrain report --run NAME     runs/<run>/report.md + plots, from the manifest and logs only

User mistakes print one line on stderr and exit with code 2; nothing is written for a stage that
did not start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from posttrain.errors import UserError
from posttrain.stages import STAGES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message)
        raise UserError(f"{self.prog}: {message}")


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """`--key value` pairs (also `--key=value`) into a dict; UserError on a dangling key."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}; overrides look like --key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise UserError(f"override --{key} needs a value")
            value = extra[i + 1]
            i += 2
        out[key.replace("-", "_")] = value
    return out


def stage_args(kind: str, argv: list[str]) -> tuple[argparse.Namespace, dict[str, str]]:
    """`RECIPE --run NAME [--force] [--no-eval] [--key value ...]` → (args, overrides).

    Shared with `posttrain.launch`, which checks a stage's inputs before starting processes.
    """
    p = _Parser(prog=f"posttrain {kind}")
    p.add_argument("recipe")
    p.add_argument("--run", default="demo")
    p.add_argument("--force", action="store_true", help="rerun even if done with this recipe")
    p.add_argument("--no-eval", action="store_true", help="skip the recipe's eval suite")
    args, extra = p.parse_known_args(argv)
    return args, parse_overrides(extra)


def _stage_command(kind: str, argv: list[str]) -> int:
    args, overrides = stage_args(kind, argv)
    from posttrain.runner import run_stage
    run_stage(kind, args.recipe, args.run, overrides, force=args.force,
              eval_after=not args.no_eval)
    return 0


def _eval_command(argv: list[str]) -> int:
    p = _Parser(prog="posttrain eval")
    p.add_argument("--run", default="demo")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage", help="a finished stage of the run")
    which.add_argument("--model", help="a model of no stage: dir, .gguf file or hub id (figures "
                                       "go to runs/<run>/eval/<model name>/, not the manifest)")
    p.add_argument("--suite", default="eval/tiny.yaml")
    p.add_argument("--weights", default=None, help="sub-dir of the stage's model, e.g. ema")
    p.add_argument("--backend", default=None, choices=["auto", "hf", "vllm"],
                   help="rollout backend (default: the suite's `backend:`)")
    p.add_argument("--data_dir", default=None,
                   help="local copies of the benchmarks (default: $POSTTRAIN_DATA_DIR)")
    args = p.parse_args(argv)
    if args.data_dir:
        import os
        os.environ["POSTTRAIN_DATA_DIR"] = args.data_dir
    from posttrain import runtime
    from posttrain.evaluate import eval_model, load_suite, run_eval
    from posttrain.manifest import Manifest
    from posttrain.tables import eval_table
    runtime.configure()
    if args.model:
        label, results = eval_model(Manifest(args.run), args.model, args.suite,
                                    backend=args.backend)
    else:
        label = args.stage
        results = run_eval(Manifest(args.run), args.stage, args.suite, backend=args.backend,
                           weights=args.weights)
    print(eval_table({label: {"eval": {load_suite(args.suite).name: results}}}))
    return 0


def _import_command(argv: list[str]) -> int:
    p = _Parser(prog="posttrain import")
    p.add_argument("file", help="a .gguf file (or pkg:<package>/<file>)")
    p.add_argument("--out", required=True, help="new HF model dir")
    args = p.parse_args(argv)
    from posttrain.gguf_import import convert, is_gguf_ref, locate
    if not is_gguf_ref(args.file):
        raise UserError(f"{args.file}: posttrain import reads .gguf files")
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new --out dir")
    convert(locate(args.file), out)
    print(f"{args.file} -> {out}")
    return 0


def _status_command(argv: list[str]) -> int:
    p = _Parser(prog="posttrain status")
    p.add_argument("--run", default="demo")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from posttrain.manifest import Manifest, stage_status
    m = Manifest(args.run)
    if not m.path.exists():
        raise UserError(f"run {args.run!r} has no manifest at {m.path}")
    if args.json:
        print(json.dumps(m.data, indent=2))
        return 0
    print(f"run {args.run}  ({m.path})")
    for name, e in m.stages.items():
        status = stage_status(e)
        extra = {
            "failed": f"  error: {e.get('error')}; rerun the same command to resume",
            "interrupted": f"  process {e.get('pid')} is gone; rerun the same command to resume",
            "running": f"  pid {e.get('pid')} on {e.get('host')}",
        }.get(status, "")
        print(f"  {name:<16}{status:<12}{e.get('kind', ''):<10}{e['output_dir']}{extra}")
    return 0


def _report_command(argv: list[str]) -> int:
    p = _Parser(prog="posttrain report")
    p.add_argument("--run", default="demo")
    args = p.parse_args(argv)
    from posttrain.manifest import Manifest
    from posttrain.report import write_report
    from posttrain.tables import eval_table
    path = write_report(args.run)
    print(eval_table(Manifest(args.run).stages))
    print(f"\nreport: {path}")
    return 0


def _fp8_command(argv: list[str]) -> int:
    p = _Parser(prog="posttrain fp8")
    p.add_argument("action", choices=["quantize", "dequantize"])
    p.add_argument("src", help="model dir (HF safetensors)")
    p.add_argument("dst", help="new dir for the converted model")
    p.add_argument("--dtype", default="bfloat16", help="dequantize: dtype of the weights")
    args = p.parse_args(argv)
    from posttrain.fp8.checkpoint import dequantize_checkpoint, quantize_checkpoint
    if args.action == "quantize":
        counts = quantize_checkpoint(args.src, args.dst)
    else:
        counts = dequantize_checkpoint(args.src, args.dst, args.dtype)
    print(f"{args.action}d {args.src} -> {args.dst}: "
          + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def _init_model_command(argv: list[str]) -> int:
    p = _Parser(prog="posttrain init-model")
    p.add_argument("--arch", required=True, help="qwen2, llama or deepseek_v3")
    p.add_argument("--tokenizer", required=True, help="a tokenizer dir (e.g. a hub model's files)")
    p.add_argument("--out", required=True, help="new model dir")
    p.add_argument("--seed", type=int, default=0)
    args, extra = p.parse_known_args(argv)
    from posttrain.models import count_params, init_model, load_model
    from posttrain.recipe import parse_override
    config = {k: parse_override(v) for k, v in parse_overrides(extra).items()}
    out = init_model(args.arch, args.tokenizer, args.out, seed=args.seed, **config)
    print(f"{args.arch} with {count_params(load_model(out)) / 1e6:.2f}M random weights around "
          f"{args.tokenizer}'s tokenizer -> {out}")
    return 0


def _student_command(argv: list[str]) -> int:
    p = _Parser(prog="posttrain student")
    p.add_argument("--from", dest="source", required=True,
                   help="the teacher: model dir, .gguf file, hub id, or a stage of --run")
    p.add_argument("--out", required=True, help="new model dir for the student")
    p.add_argument("--layers", default="every_other",
                   help="teacher layers kept: every_other (default), all, spread:N (N evenly spaced, "
                        "first and last kept), or e.g. 0,2,4")
    p.add_argument("--arch", default=None, help="llama or qwen2 (default: the teacher's)")
    p.add_argument("--run", default="demo", help="the run whose stage --from may name")
    args = p.parse_args(argv)
    from posttrain.student import make_student
    record = make_student(args.source, args.out, args.layers, args.arch, args.run)
    print(f"{args.source} -> {args.out}: {record['arch']}, {len(record['kept_layers'])} of "
          f"{record['teacher_layers']} layers, {record['params_after']:,} of "
          f"{record['params_before']:,} parameters")
    return 0


COMMANDS = {"eval": _eval_command, "status": _status_command, "report": _report_command,
            "fp8": _fp8_command, "init-model": _init_model_command, "import": _import_command,
            "student": _student_command}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: posttrain {{{','.join([*STAGES, *COMMANDS])}}} ...  "
             f"(stages: posttrain STAGE RECIPE.yaml --run NAME [--key value ...])")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        from posttrain import runtime
        runtime.quiet()
        if cmd in STAGES:
            return _stage_command(cmd, rest)
        if cmd in COMMANDS:
            return COMMANDS[cmd](rest)
        raise UserError(f"unknown command {cmd!r}; {usage}")
    except UserError as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("posttrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
