"""On-disk cache of rollouts, keyed by (model fingerprint, backend, rendered prompt, sampling).

Rerunning an eval suite or a data stage (rejection sampling, distillation) on the same model must
not regenerate what is already on disk: generation is the expensive part of both. One small JSON
file per prompt, written atomically (temp file + `os.replace`), so concurrent writers of the same
key simply race to write identical-purpose content, and a killed run leaves either a complete
entry or none — never half of one. Entries are written batch by batch, so an interrupted
generation resumes where it stopped.

The model fingerprint hashes the model's files (weights, config, tokenizer) by content; the
per-file hashes are memoised by (path, size, mtime) so a multi-GB checkpoint is read once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from posttrain import atomic
from posttrain.rollout.types import Completion, Sampling

# Files that never change what a model generates.
_IGNORED = {"posttrain_plan.json", "README.md", "training_args.bin"}


def default_cache_dir() -> Path:
    """$POSTTRAIN_ROLLOUT_CACHE, else `<runs dir>/.rollout_cache`."""
    from posttrain.manifest import runs_dir
    env = os.environ.get("POSTTRAIN_ROLLOUT_CACHE")
    return Path(env) if env else runs_dir() / ".rollout_cache"


def _file_sha(path: Path, memo_dir: Path | None) -> str:
    st = path.stat()
    memo = None
    if memo_dir is not None:
        stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        memo = memo_dir / (hashlib.sha256(stamp.encode()).hexdigest()[:32] + ".sha")
        if memo.exists():
            return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        atomic.write_text(memo, digest)
    return digest


def model_fingerprint(model_ref: Any, cache_dir: Path | None = None) -> str:
    """A content hash of a model: a local dir, a hub id, or an in-memory (model, tokenizer).

    In-memory models are hashed from their tensors (they may have been changed since loading);
    hub ids by the commit of their locally cached snapshot.
    """
    h = hashlib.sha256()
    if isinstance(model_ref, tuple):
        model, tokenizer = model_ref
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu").contiguous().view(-1).view(dtype=_byte_dtype())
                     .numpy().tobytes())
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
        h.update(str(tokenizer.chat_template).encode())
        return h.hexdigest()
    path = Path(str(model_ref)).expanduser()
    if not path.exists():
        path = _hub_snapshot(str(model_ref))
        if path is None:
            return hashlib.sha256(f"hub:{model_ref}".encode()).hexdigest()
    memo_dir = cache_dir / "fingerprints" if cache_dir is not None else None
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if f.name in _IGNORED or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode())
        h.update(_file_sha(f, memo_dir).encode())
    return h.hexdigest()


def _byte_dtype():
    import torch
    return torch.uint8


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached locally: fall back to keying on the id
        return None


class RolloutCache:
    """Per-prompt completions on disk under `root/<model fingerprint>/<key[:2]>/<key>.json`."""

    def __init__(self, root: Path, model_fp: str, backend: str, sampling: Sampling):
        self.dir = Path(root) / model_fp[:24]
        self._prefix = json.dumps({"model": model_fp, "backend": backend,
                                   "sampling": dataclasses.asdict(sampling)}, sort_keys=True)

    def key(self, prompt_text: str) -> str:
        return hashlib.sha256((self._prefix + "\x00" + prompt_text).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, prompt_text: str) -> list[Completion] | None:
        path = self._path(self.key(prompt_text))
        try:
            rows = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # missing, or written by a foreign tool
            return None
        return [Completion(**{**r, "messages": tuple(r.get("messages") or ())}) for r in rows]

    def put(self, prompt_text: str, completions: list[Completion]) -> None:
        rows = [dataclasses.asdict(c) for c in completions]
        atomic.write_text(self._path(self.key(prompt_text)), json.dumps(rows))
