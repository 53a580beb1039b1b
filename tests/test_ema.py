"""EMA in CPU memory (posttrain.ema): the saved EMA is the EMA computed directly over the
folded snapshots of a real Trainer run's weights (the closed form when none was skipped); a fold
slower than the steps skips snapshots and keeps the time constant; config errors are one line;
a stage saves it under model/ema and records its figures in the manifest."""

from __future__ import annotations

import pytest
import torch

from posttrain.ema import EMACallback, EMAConfig
from posttrain.errors import UserError


@pytest.mark.parametrize("value, message", [
    ({"decay": 1.0}, "ema.decay must be a number in (0, 1)"),
    ({"decay": 0}, "ema.decay must be a number in (0, 1)"),
    ({"decay": "high"}, "ema.decay must be a number in (0, 1)"),
    ({"every": 0}, "ema.every must be an integer >= 1"),
    ({"every": 1.5}, "ema.every must be an integer >= 1"),
    ({"decya": 0.9}, "ema: unknown key(s) ['decya']"),
])
def test_config_errors(value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        EMAConfig.parse(value)


def test_config_defaults():
    assert EMAConfig.parse({}) == EMAConfig(0.999, 1)
    assert EMAConfig.parse(None) is None


class _Trajectory:
    """Records the trainable weights after every optimizer step (and before the first)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.steps: list[dict[str, torch.Tensor]] = []

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                outer.record(model)

            def on_step_end(self, args, state, control, model=None, **kw):
                outer.record(model)

        self.callback = CB()

    def record(self, model):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad})


def _tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _train_with_ema(tmp_path, ema, steps: int, extra_callbacks=()):
    """A real Trainer run of the tiny Llama with `ema`; the weight trajectory it took."""
    import datasets
    from transformers import Trainer, TrainingArguments

    model = _tiny_llama()
    ids = torch.randint(0, 32, (24, 12), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    traj = _Trajectory()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, learning_rate=0.05,
                             per_device_train_batch_size=4, report_to="none", use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[traj.callback, *extra_callbacks, ema]).train()
    return traj


def _direct_ema(traj, folds, decay):
    """The EMA computed directly over the folded snapshots: each fold of the weights at step t
    standing for k due updates weighs them by 1 − decay**k."""
    out = {}
    for name, theta0 in traj.steps[0].items():
        avg = theta0.double()
        for step, k in folds:
            avg = decay ** k * avg + (1 - decay ** k) * traj.steps[step][name].double()
        out[name] = avg
    return out


@pytest.mark.parametrize("every", [1, 2])
def test_ema_equals_closed_form_of_trajectory(tmp_path, every):
    """Whatever the worker kept up with: every due update is folded once (a skip is made up by
    the next fold's decay ** k), the last due step's weights are in, and the saved EMA equals the
    direct computation over the folds; with no skip that is the closed form
    d^n θ_0 + Σ_j (1 − d) d^(n − j) θ_(j·every)."""
    from safetensors.torch import load_file

    steps, decay = 6, 0.7
    ema = EMACallback(EMAConfig(decay, every), tmp_path / "ema")
    traj = _train_with_ema(tmp_path, ema, steps)

    due = list(range(every, steps + 1, every))
    assert sum(k for _, k in ema.folds) == len(due)
    assert ema.folds[-1][0] == due[-1]
    assert [s for s, _ in ema.folds] == sorted({s for s, _ in ema.folds})
    assert ema.stats()["updates"] == len(ema.folds)
    saved = load_file(str(tmp_path / "ema" / "model.safetensors"))
    expected = _direct_ema(traj, ema.folds, decay)
    for name, want in expected.items():
        assert torch.allclose(saved[name].double(), want, atol=1e-6), name
        assert not torch.allclose(saved[name], traj.steps[-1][name], atol=1e-4), f"{name}: EMA = last"
    if not ema.skipped:
        n = len(due)
        for name, theta0 in traj.steps[0].items():
            closed = decay ** n * theta0.double()
            for j, t in enumerate(due, start=1):
                closed += (1 - decay) * decay ** (n - j) * traj.steps[t][name].double()
            assert torch.allclose(expected[name], closed, atol=1e-9), name
    # The tied output head is saved with the same EMA as the embedding it shares.
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ema")
    assert torch.equal(loaded.lm_head.weight, saved["model.embed_tokens.weight"])


def test_a_fold_slower_than_the_steps_skips_snapshots_and_keeps_the_time_constant(
        tmp_path, monkeypatch):
    """The first fold is held until the last step ends: the loop never waits for it, the
    snapshots due meanwhile are skipped, and the next fold stands for them all (decay ** k), so
    the saved EMA equals the direct computation over the two folds."""
    import threading

    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import posttrain.ema as ema_module

    steps, decay = 6, 0.7
    release = threading.Event()
    real_fold = ema_module.EMACallback._fold

    def held_fold(self, buf, weight):
        assert release.wait(60), "training never reached its last step"
        real_fold(self, buf, weight)

    monkeypatch.setattr(ema_module.EMACallback, "_fold", held_fold)

    class ReleaseAtLastStep(TrainerCallback):  # runs before the EMA's own on_step_end
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps:
                release.set()

    ema = EMACallback(EMAConfig(decay, 1), tmp_path / "ema")
    traj = _train_with_ema(tmp_path, ema, steps, [ReleaseAtLastStep()])

    assert ema.folds[0] == (1, 1)
    assert ema.skipped >= steps - 2           # steps 2..5 at least found the one buffer busy
    assert sum(k for _, k in ema.folds) == steps and ema.folds[-1][0] == steps
    stats = ema.stats()
    assert stats["effective_interval"] == steps / len(ema.folds) > 1
    saved = load_file(str(tmp_path / "ema" / "model.safetensors"))
    for name, want in _direct_ema(traj, ema.folds, decay).items():
        assert torch.allclose(saved[name].double(), want, atol=1e-6), name


def test_a_cpu_copy_is_finished_before_the_weights_change():
    """The loop's optimizer step takes the pieces of a snapshot copy the worker has not: the
    buffer then holds the weights of the step it was taken at, not of the next."""
    from posttrain.ema import GRAIN, SharedWork

    src = torch.arange(3 * GRAIN + 5, dtype=torch.float32)
    dst = torch.zeros_like(src)
    bounds = [(i, min(i + GRAIN, src.numel())) for i in range(0, src.numel(), GRAIN)]
    work = SharedWork(len(bounds), lambda i: dst[bounds[i][0]:bounds[i][1]].copy_(
        src[bounds[i][0]:bounds[i][1]]))
    work.wait()  # no worker took any piece: the waiting thread does them all
    src += 1     # the optimizer step
    assert torch.equal(dst, src - 1)
    failing = SharedWork(2, lambda i: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.wait()


def test_stage_saves_ema_fp8_and_balance_outputs(tiny_run):
    """One SFT stage with every backend option on: EMA under model/ema (where `posttrain eval
    --weights ema` looks), expert load log and plot, FP8 training that still learns."""
    import json

    from transformers import AutoModelForCausalLM

    from posttrain.manifest import Manifest
    from posttrain.runner import run_stage

    entry = run_stage("sft", "recipes/tiny/sft.yaml", tiny_run,
                      {"name": "sft_backend", "max_steps": "4", "save_steps": "1000",
                       "eval_suite": "null", "fp8": "true", "ema": "{decay: 0.5}",
                       "moe_balance": "{gamma: 0.01, alpha: 0.001}", "logging_steps": "1",
                       "warmup_steps": "0", "per_device_train_batch_size": "8"},
                      eval_after=False)
    assert entry["status"] == "done"
    ema_figures = entry["metrics"]["ema"]  # every due update folded, some maybe as one fold
    assert 1 <= ema_figures["updates"] <= 4 and ema_figures["every"] == 1
    assert ema_figures["effective_interval"] == 4 / ema_figures["updates"]
    model_dir = Manifest(tiny_run).resolve("sft_backend")
    ema = AutoModelForCausalLM.from_pretrained(model_dir / "ema")
    final = AutoModelForCausalLM.from_pretrained(model_dir)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ema.state_dict()[w], final.state_dict()[w])
    stage_dir = model_dir.parent
    loads = [json.loads(line) for line in (stage_dir / "moe_load.jsonl").read_text().splitlines()]
    assert len(loads) == 4 and len(loads[0]["max_mean_load"]) == 2
    assert (stage_dir / "moe_load.png").is_file()
    logs = [json.loads(line) for line in (stage_dir / "logs.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert all(0 < loss < 10 for loss in losses) and "moe_max_mean_load" in logs[0]
    bias = final.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0                     # the balance update reached the checkpoint


@pytest.mark.parametrize("on_gpu, cores, local_processes, threads", [
    (False, 16, 1, 1),   # beside a CPU loop: one core, whatever the machine
    (True, 16, 1, 15),   # beside a GPU loop: all but the loop's
    (True, 16, 8, 1),    # eight ranks on the node: each its share, less its loop
    (True, 64, 8, 7),
])
def test_fold_threads(monkeypatch, on_gpu, cores, local_processes, threads):
    import os

    from posttrain.ema import fold_threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert fold_threads(on_gpu) == threads
