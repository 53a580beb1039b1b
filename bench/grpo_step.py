"""Seconds per GRPO step: `posttrain grpo` vs a plain TRL GRPOTrainer script, identical settings.

Both sides train the same tiny Qwen2 (built here, nothing downloaded) on the same prompts with
the same reward functions and seed. The posttrain side goes through the stage (`run_stage`:
recipe, preflight, manifest, JSONL logger and the stage's callbacks); the plain side is the
dozen lines a TRL user writes, with the same config values spelled out.

What makes the comparison honest, and why each piece is here:
- Same config: each side's resolved `GRPOConfig` is captured as training starts and the two must
  agree on every field but the output paths, or the bench stops. (Cause of an earlier, bogus
  0.2 ratio: TRL's GRPOConfig defaults to `bf16=True`, which on CPU autocasts every matmul to
  bf16 and ran ~4x slower; posttrain sets `bf16` only on GPU, so the plain side did other work.)
- Same inputs: model weights, prompt rows and tokenizer are fingerprinted at train start and
  must match.
- Same amount of generation: sampling is seeded (not greedy) and `min_new_tokens =
  max_completion_length` (through `generation_kwargs`, on both sides) makes every completion
  exactly that long, so a step is the same number of tokens whatever the policy samples. Mean
  completion length and tokens/s are reported per side to show it.
- Steady state: a callback stamps every step end; a step's time runs from the previous step's end
  to its own, so it holds generation, loss, optimizer and every callback and log write of either
  side. The first `--warmup` steps are dropped. Startup and the final save are paid once per
  stage, so they are not in the ratio; the table shows them apart ("outside steps": a run's wall
  time minus its step loop, in this process, so library imports are not in it).
- Noise: the sides alternate A B B A across rounds so load drift on a shared machine hits both
  alike. The ratio is taken per round, between its two adjacent runs' median step times, and
  the median over rounds is reported: one round hit by a neighbour's burst moves it little
  (pooled medians per side are in the table too).

Dynamic sampling: a third side runs the stage with `dynamic_sampling: refill` (DAPO, posttrain's
own: TRL has none, so it has no plain counterpart). Its steps generate more (up to
`max_sampling_rounds` batches while groups are flat, as every group of this random-weight policy
is), so it is reported per step and per generated completion against the plain side:
`refill_per_generation_ratio` near 1 means refill costs its extra generation and nothing else.

Run: `POSTTRAIN_THREADS=1 python bench/grpo_step.py [--steps 12] [--rounds 6] [--warmup 2]`.
Last line: `{"grpo_step_ratio": ..., "refill_step_ratio": ..., "refill_generated_frac": ...,
"refill_per_generation_ratio": ...}` (posttrain / plain seconds per step; goal <= 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import TrainerCallback  # noqa: E402

MAX_LEN = 48
# GRPOConfig values both sides pass (posttrain reads them from the recipe YAML).
SETTINGS: dict[str, Any] = dict(
    num_generations=8, per_device_train_batch_size=32, max_completion_length=MAX_LEN,
    generation_kwargs={"min_new_tokens": MAX_LEN}, temperature=0.7, beta=0.0, loss_type="dapo",
    learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=1, log_completions=False,
    save_steps=100_000,  # no checkpoint inside the timed steps on either side
)
# What the stage sets on its own for a CPU run (posttrain.recipe.TRAINER_BASE); a plain
# script must spell these out to do the same work. bf16 above all: TRL defaults it to True.
CPU_RUN: dict[str, Any] = dict(
    use_cpu=True, bf16=False, report_to="none", dataloader_num_workers=0, disable_tqdm=False,
    logging_first_step=True, save_strategy="steps", save_total_limit=2,
)
SEED = 0
PROMPTS = {"task": "arithmetic", "n": 256, "digits": [1, 3]}
REWARDS = {"accuracy": 1.0, "format": 0.1}
# Config fields allowed to differ: where each side writes, nothing it computes.
PATH_FIELDS = {"output_dir", "logging_dir", "run_name"}


class StepTimer(TrainerCallback):
    """Per-step wall times and completion lengths, plus fingerprints of what the trainer got.

    The same class is handed to both trainers, so both sides are measured by the same code.
    """

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.fingerprint: dict[str, str] = {}
        self.stamps: list[float] = []
        self.lengths: list[float] = []
        self.rollouts: list[tuple[float, float]] = []  # (num_tokens, reward) per logged step
        self.generated: list[float] = []  # completions generated per step / batch (refill)

    def on_train_begin(self, args, state, control, model=None, processing_class=None,
                       train_dataloader=None, **kwargs):
        self.config = args.to_dict()
        self.fingerprint = {"model": _digest(t.detach().numpy().tobytes()
                                             for _, t in sorted(model.state_dict().items())),
                            # Not padding_side: GRPOTrainer pads with an explicit side.
                            "tokenizer": _digest([json.dumps(
                                [processing_class.get_vocab(), processing_class.chat_template,
                                 processing_class.pad_token_id, processing_class.eos_token_id],
                                sort_keys=True).encode()]),
                            "prompts": _digest(json.dumps(r, sort_keys=True).encode()
                                               for r in train_dataloader.dataset.to_list())}
        self.stamps = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "completions/mean_length" in logs:
            self.lengths.append(logs["completions/mean_length"])
            self.rollouts.append((logs.get("num_tokens"), logs.get("reward")))
            self.generated.append(logs.get("dynamic_sampling/generated_frac", 1.0))

    def on_train_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())  # the last step's logging ends here

    def step_times(self, warmup: int) -> list[float]:
        """Seconds of each step after the first `warmup` (previous step end → this step end)."""
        ends = self.stamps[1:-1]
        return [b - a for a, b in zip(self.stamps[:-2], ends)][warmup:]

    @property
    def loop_seconds(self) -> float:
        return self.stamps[-1] - self.stamps[0]


def _digest(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def build_model(out: Path) -> Path:
    """A tiny Qwen2 with the demo tokenizer, saved as an ordinary HF model dir (no hub)."""
    from posttrain.data import task_rows
    from posttrain.models import build_tiny_model, train_tokenizer

    rows = task_rows({**PROMPTS, "n": 500}, seed=SEED)
    tok = train_tokenizer([f"{r['prompt']} {r['trace']} {r['answer']}" for r in rows], out)
    build_tiny_model("qwen2", tok, seed=SEED).save_pretrained(out)
    return out


def run_plain(model_dir: Path, work: Path, steps: int, timer: StepTimer) -> None:
    """The plain TRL script: load, dataset, GRPOConfig, GRPOTrainer, train."""
    import datasets
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.answer_format import TAGS_SYSTEM_PROMPT as DEFAULT_SYSTEM_PROMPT
    from posttrain.data import prompt_messages, task_rows
    from posttrain.rewards import build_reward_funcs

    # The demo tokenizer is saved as a generic one; AutoTokenizer would rebuild it as the model
    # type's class (Qwen2Tokenizer), which adds a token of its own.
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = task_rows(PROMPTS, seed=SEED)
    # The format rewards read each row's answer format, as the stage's prompt rows carry it.
    ds = datasets.Dataset.from_list([{**r, "prompt": prompt_messages(r["prompt"],
                                                                     DEFAULT_SYSTEM_PROMPT),
                                      "answer_format": "tags"}
                                     for r in rows]).remove_columns(["trace"])
    funcs, weights = build_reward_funcs(REWARDS)
    args = GRPOConfig(output_dir=str(work), max_steps=steps, seed=SEED, reward_weights=weights,
                      **CPU_RUN, **SETTINGS)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    trainer.train()


def run_posttrain(model_dir: Path, work: Path, steps: int, timer: StepTimer,
                  extra: dict[str, Any] | None = None) -> None:
    """The same through the stage: recipe YAML → run_stage (preflight, manifest, final save);
    `extra`: posttrain recipe keys on top (dynamic sampling)."""
    import yaml

    import posttrain.stages.grpo as grpo_stage
    from posttrain.runner import run_stage

    os.environ["POSTTRAIN_RUNS_DIR"] = str(work / "runs")
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "grpo.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "grpo", "init_from": str(model_dir), "prompt_data": [PROMPTS], "rewards": REWARDS,
        "eval_suite": None, "max_steps": steps, "seed": SEED,
        "threads": int(os.environ.get("POSTTRAIN_THREADS", 0)) or None, **SETTINGS,
        **(extra or {})}))
    # The timer rides after the stage's own callbacks; everything else is the stage as shipped.
    own = grpo_stage.stage_callbacks
    grpo_stage.stage_callbacks = lambda *a, **k: [*own(*a, **k), timer]
    try:
        run_stage("grpo", str(recipe), "bench", force=True, eval_after=False)
    finally:
        grpo_stage.stage_callbacks = own


@contextlib.contextmanager
def _trainer_chatter_to_stderr() -> Iterator[None]:
    """Both trainers print a log dict per step; stdout is kept for the table and the JSON line."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run_refill(model_dir: Path, work: Path, steps: int, timer: StepTimer) -> None:
    """The stage with DAPO dynamic sampling, refilling flat groups for up to 4 rounds."""
    run_posttrain(model_dir, work, steps, timer,
                  {"dynamic_sampling": "refill", "max_sampling_rounds": 4})


def check_same_work(plain: StepTimer, ours: StepTimer) -> None:
    """Stop unless both sides ran the same config on the same model, tokenizer and prompts."""
    fields = (set(plain.config) | set(ours.config)) - PATH_FIELDS
    diff = {k: (plain.config.get(k), ours.config.get(k)) for k in sorted(fields)
            if plain.config.get(k) != ours.config.get(k)}
    if diff:
        raise SystemExit(f"GRPOConfig differs between the sides (plain, posttrain): {diff}")
    if plain.fingerprint != ours.fingerprint:
        raise SystemExit(f"inputs differ: plain {plain.fingerprint} vs posttrain {ours.fingerprint}")


def summarise(timers: list[StepTimer], walls: list[float], warmup: int) -> dict[str, Any]:
    """One side's figures: per-run medians (s/step, s/token), pooled step stats, lengths."""
    g = SETTINGS["per_device_train_batch_size"]
    runs = [statistics.median(t.step_times(warmup)) for t in timers]
    lengths = [statistics.mean(t.lengths) for t in timers]
    pooled = [s for t in timers for s in t.step_times(warmup)]
    return dict(runs=runs, per_token=[s / (g * n) for s, n in zip(runs, lengths)],
                med=statistics.median(pooled), mean=statistics.mean(pooled),
                length=statistics.mean(lengths), tok_s=g * statistics.mean(lengths)
                / statistics.median(pooled),
                outside=statistics.median(w - t.loop_seconds for w, t in zip(walls, timers)))


def print_report(timers: dict[str, list[StepTimer]], walls: dict[str, list[float]],
                 args: argparse.Namespace, threads: int, seconds: float) -> None:
    """The table, then the JSON line. The ratio pairs the two runs of each round (adjacent in
    time, so under the same machine load) and takes the median over rounds."""
    rows = {name: summarise(timers[name], walls[name], args.warmup) for name in timers}
    plain, ours, refill = rows.values()
    rounds = [o / p for o, p in zip(ours["runs"], plain["runs"])]
    rounds_tok = [o / p for o, p in zip(ours["per_token"], plain["per_token"])]
    ratio, token_ratio = statistics.median(rounds), statistics.median(rounds_tok)
    same = all(a.rollouts == b.rollouts for a, b in zip(*list(timers.values())[:2]))
    refill_rounds = [r / p for r, p in zip(refill["runs"], plain["runs"])]
    refill_ratio = statistics.median(refill_rounds)
    generated = statistics.mean(g for t in list(timers.values())[2] for g in t.generated)

    print(f"\nGRPO step time, tiny qwen2, {SETTINGS['per_device_train_batch_size']} completions/"
          f"step (G={SETTINGS['num_generations']}, exactly {MAX_LEN} tokens each, "
          f"T={SETTINGS['temperature']}), {threads} thread(s), {args.rounds} runs/side A-B-B-A x "
          f"{args.steps} steps ({args.warmup} warm-up dropped), {seconds:.0f}s")
    print(f"{'path':<24}{'s/step med':>11}{'mean':>8}{'compl. len':>11}{'tok/s':>8}"
          f"{'outside steps s':>16}   per-run medians")
    for name, r in rows.items():
        print(f"{name:<24}{r['med']:>11.3f}{r['mean']:>8.3f}{r['length']:>11.1f}{r['tok_s']:>8.0f}"
              f"{r['outside']:>16.2f}   {' '.join(f'{x:.3f}' for x in r['runs'])}")
    print(f"{'per-round ratio':<24}{'':>54}   {' '.join(f'{x:.3f}' for x in rounds)}")
    print(f"same rollouts on both sides (per-step token counts and rewards): "
          f"{'yes' if same else 'no (seeded sampling diverged; lengths are still forced equal)'}")
    print(f"{'ratio posttrain/plain':<24}{ratio:>11.3f}   per token {token_ratio:.3f}   "
          f"(median over rounds; goal <= 1.05; configs, weights, tokenizer, prompts checked equal)")
    print(f"{'refill/plain per step':<24}{refill_ratio:>11.3f}   generated {generated:.2f}x the "
          f"batch per step, so per generated completion {refill_ratio / generated:.3f}")
    print(json.dumps({"grpo_step_ratio": round(ratio, 4), "grpo_token_ratio": round(token_ratio, 4),
                      "refill_step_ratio": round(refill_ratio, 4),
                      "refill_generated_frac": round(generated, 3),
                      "refill_per_generation_ratio": round(refill_ratio / generated, 4),
                      "plain_s_per_step": round(plain["med"], 4),
                      "posttrain_s_per_step": round(ours["med"], 4),
                      "plain_mean_completion_len": round(plain["length"], 2),
                      "posttrain_mean_completion_len": round(ours["length"], 2)}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="training steps per run")
    p.add_argument("--rounds", type=int, default=6, help="runs per side, in A B B A order")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run not timed")
    args = p.parse_args(argv)
    if args.steps - args.warmup < 2:
        p.error("--steps must exceed --warmup by at least 2")
    from posttrain import runtime
    threads = runtime.configure()
    runtime.quiet()
    # The heavy imports both sides share, paid before any run so the first one does not carry them.
    from trl import GRPOTrainer  # noqa: F401

    import posttrain.runner  # noqa: F401
    sides = {"plain TRL GRPOTrainer": run_plain, "posttrain grpo": run_posttrain,
             "posttrain grpo refill": run_refill}
    timers: dict[str, list[StepTimer]] = {name: [] for name in sides}
    walls: dict[str, list[float]] = {name: [] for name in sides}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model")
        order = list(sides)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):  # A B C, C B A, ...
                timer = StepTimer()
                start = time.perf_counter()
                with _trainer_chatter_to_stderr():
                    sides[name](model_dir, work / f"{name.replace(' ', '_')}{r}", args.steps, timer)
                walls[name].append(time.perf_counter() - start)
                timers[name].append(timer)
                print(f"[bench] round {r + 1}/{args.rounds} {name}: "
                      f"{statistics.median(timer.step_times(args.warmup)):.3f} s/step",
                      file=sys.stderr, flush=True)
    names = list(timers)
    for other in names[1:]:
        for a, b in zip(timers[names[0]], timers[other]):
            check_same_work(a, b)

    print_report(timers, walls, args, threads, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
