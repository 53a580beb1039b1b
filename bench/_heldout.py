"""What the benches that train and evaluate whole stages share: a scratch runs dir, the thread
budget, and the held-out suite they score every arm on (200 unseen 1-2 digit sums x 4 samples at
T=0.7, the demo's eval). Not a bench itself (`make bench` skips files starting with `_`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SUITE = {"name": "heldout", "n": 4, "k": 4, "temperature": 0.7, "max_new_tokens": 96,
         "tasks": [{"name": "arithmetic", "task": "arithmetic", "n_prompts": 200,
                    "digits": [1, 2]}]}


def bench_workspace(prefix: str, threads: int) -> tuple[Path, Path]:
    """(work dir, held-out suite path): runs go to a fresh temp dir, recipes resolve from the
    repo root, torch runs `threads` threads and the libraries stay quiet."""
    work = Path(tempfile.mkdtemp(prefix=f"posttrain-bench-{prefix}-"))
    os.environ["POSTTRAIN_RUNS_DIR"] = str(work / "runs")
    os.chdir(ROOT)
    from posttrain import runtime
    runtime.configure(threads)
    runtime.quiet()
    suite = work / "heldout.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    return work, suite
