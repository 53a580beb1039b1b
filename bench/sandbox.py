"""Sandboxed executions per second: the pool vs one at a time, and against a bare `python -c`.

All three sides run the same small programs with their asserts (a few functions a code task
asks for, 3 tests each):
- pool: `Sandbox()` with one fork server per core, the jobs handed over as one batch (what the
  code reward does with a GRPO step's completions);
- serial: `Sandbox(workers=1)`, the same jobs one after another;
- bare: what a user without a sandbox writes, `subprocess.run([python, "-c", program + tests])`
  per job, pass/fail from the exit code (no isolation at all).
Each side is warmed up first (servers started, a few jobs run; the interpreter's files cached)
and start-up is not timed. The sides alternate over rounds (pool, serial, bare, then reversed)
so load drift on a shared machine hits all alike; the median over rounds is reported.

Run: `python bench/sandbox.py [--jobs 300] [--bare-jobs 40] [--rounds 3]`.
Last line: `{"executions_per_s_pool": ..., "executions_per_s_serial": ...,
"overhead_vs_bare_python": ...}` (overhead: sandboxed seconds per execution, one at a time, over
bare `python -c` seconds per execution; below 1 means the sandbox is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain.sandbox import Job, Sandbox

PROGRAMS = [
    ("def add(a, b):\n    return a + b\n",
     ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]),
    ("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     ["assert fib(10) == 55", "assert fib(1) == 1", "assert fib(20) == 6765"]),
    ("import re\ndef words(s):\n    return re.findall(r'[a-z]+', s.lower())\n",
     ["assert words('Hi there') == ['hi', 'there']", "assert words('') == []",
      "assert words('A-b') == ['a', 'b']"]),
    ("from collections import Counter\ndef top(xs):\n    return Counter(xs).most_common(1)[0][0]\n",
     ["assert top([1, 1, 2]) == 1", "assert top('aab') == 'a'", "assert top([3]) == 3"]),
]


def jobs(n: int) -> list[Job]:
    return [Job(*PROGRAMS[i % len(PROGRAMS)]) for i in range(n)]


def time_sandbox(box: Sandbox, work: list[Job]) -> float:
    start = time.perf_counter()
    verdicts = box.run(work)
    seconds = time.perf_counter() - start
    assert all(v.fraction == 1.0 for v in verdicts), [v for v in verdicts if v.fraction != 1.0][:3]
    return seconds


def time_bare(work: list[Job]) -> float:
    start = time.perf_counter()
    for job in work:
        source = job.program + "\n" + "\n".join(job.imports) + "\n" + "\n".join(job.tests) + "\n"
        subprocess.run([sys.executable, "-c", source], check=True, stdin=subprocess.DEVNULL,
                       timeout=30)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=300, help="executions per sandbox side per round")
    ap.add_argument("--bare-jobs", type=int, default=40, help="bare python -c runs per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work, bare_work = jobs(args.jobs), jobs(args.bare_jobs)
    pool, serial = Sandbox(), Sandbox(workers=1)
    try:
        for box in (pool, serial):  # warm-up: servers up, every program once
            time_sandbox(box, jobs(2 * len(PROGRAMS)))
        time_bare(jobs(len(PROGRAMS)))
        per_round: dict[str, list[float]] = {"pool": [], "serial": [], "bare": []}
        for r in range(args.rounds):
            order = ["pool", "serial", "bare"] if r % 2 == 0 else ["bare", "serial", "pool"]
            for side in order:
                if side == "bare":
                    per_round[side].append(args.bare_jobs / time_bare(bare_work))
                else:
                    box = pool if side == "pool" else serial
                    per_round[side].append(args.jobs / time_sandbox(box, work))
        rate = {side: statistics.median(v) for side, v in per_round.items()}
        protections = pool.protections()
    finally:
        pool.close()
        serial.close()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"sandbox: {pool.workers} fork server(s) on {cores} core(s); network: "
          f"{protections['network']}; uid {protections['uid']}; {protections['limits']}")
    print(f"{'side':<34}{'executions/s':>14}{'ms each':>10}   per round")
    for side, label in (("pool", f"sandbox, pool of {pool.workers}"), ("serial", "sandbox, one at a time"),
                        ("bare", "bare python -c (no isolation)")):
        rounds = " ".join(f"{x:.1f}" for x in per_round[side])
        print(f"{label:<34}{rate[side]:>14.1f}{1000 / rate[side]:>10.2f}   {rounds}")
    overhead = rate["bare"] / rate["serial"]
    print(f"pool speed-up over one at a time: {rate['pool'] / rate['serial']:.2f}x; sandboxed "
          f"execution costs {overhead:.3f}x a bare python -c")
    print(json.dumps({"executions_per_s_pool": round(rate["pool"], 1),
                      "executions_per_s_serial": round(rate["serial"], 1),
                      "overhead_vs_bare_python": round(overhead, 4)}))


if __name__ == "__main__":
    main()
