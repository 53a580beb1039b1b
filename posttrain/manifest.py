"""`runs/<run>/manifest.json`: the single record of a run and the lineage of its stages.

Each stage entry holds its status (running/done/failed), output_dir, its resolved plan
(posttrain.plan: recipe values, trainer settings, references) and the plan's sha256, the git
commit, start/end times, and eval figures at `stages.<stage>.eval.<suite>.<task>`. Later stages resolve `init_from: sft` through it — never by
guessing the latest checkpoint. Writes are atomic (temp file + `os.replace`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.atomic import write_json
from posttrain.errors import UserError


def runs_dir() -> Path:
    """Where runs live: $POSTTRAIN_RUNS_DIR, else ./runs."""
    return Path(os.environ.get("POSTTRAIN_RUNS_DIR", "runs"))


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def process_state(entry: dict[str, Any]) -> str:
    """`alive`, `dead` or `unknown` for the process recorded in a `running` stage entry.

    A `kill -9`ed stage cannot record its own end, so its entry stays `running`; this tells such
    an entry from a live run. `unknown` when it ran on another host or recorded no pid. A pid that
    was reused by an unrelated process counts as dead: the live one must be a posttrain process.
    """
    pid, host = entry.get("pid"), entry.get("host")
    if not pid or host != socket.gethostname():
        return "unknown"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "alive"  # no /proc (macOS): trust the pid
    return "alive" if b"posttrain" in cmdline else "dead"


def stage_status(entry: dict[str, Any]) -> str:
    """The status to show: `running` entries whose process is gone read `interrupted`."""
    status = entry.get("status", "?")
    if status == "running" and process_state(entry) == "dead":
        return "interrupted"
    return status


class Manifest:
    """Read/modify/write access to one run's manifest. Every mutation is saved at once."""

    def __init__(self, run: str, root: Path | None = None):
        if not run or "/" in run or run.startswith("."):
            raise UserError(f"bad run name {run!r}: use letters, digits, '-' or '_'")
        self.run = run
        self.run_dir = Path(root or runs_dir()) / run
        self.path = self.run_dir / "manifest.json"
        self.data: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"run": self.run, "created": now(), "stages": {}}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.path} is not valid JSON ({e}); fix or remove it") from None

    def save(self) -> None:
        write_json(self.path, self.data)

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.stages.get(name)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def resolve(self, name: str) -> Path:
        """Checkpoint dir of finished stage `name`; UserError if missing or unfinished."""
        entry = self.stage(name)
        if entry is None:
            done = [s for s, e in self.stages.items() if e.get("status") == "done"]
            raise UserError(
                f"stage {name!r} has not run in run {self.run!r} (done: {', '.join(done) or 'none'});"
                f" run that stage first (`posttrain STAGE RECIPE --run {self.run}`)")
        if entry.get("status") != "done":
            raise UserError(f"stage {name!r} of run {self.run!r} is {entry.get('status')!r}, not done;"
                            f" rerun it first (`posttrain STAGE RECIPE --run {self.run} ...`)")
        return Path(entry["output_dir"])

    @contextlib.contextmanager
    def _update(self) -> Iterator[None]:
        """Read-modify-write under an exclusive lock on `manifest.json.lock`.

        Another process (an eval of another stage, a stage of the same run) may write at any
        time: re-reading inside the lock means our stale copy never overwrites its change.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "manifest.json.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.data = self._read()
                yield
                self.save()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def begin(self, plan) -> None:
        """Record that stage `plan.name` starts, with its whole plan (a `StagePlan`)."""
        with self._update():
            prev = self.stages.get(plan.name, {})
            self.stages[plan.name] = {
                "kind": plan.kind,
                "status": "running",
                "output_dir": plan.output["dir"],
                "output_kind": plan.output["kind"],
                "plan": plan.to_dict(),
                "plan_sha256": plan.sha256,
                "git_commit": git_commit(),
                "started": now(),
                "ended": None,
                "attempts": prev.get("attempts", 0) + 1,
                # Who runs it: `posttrain status` tells a live run from one whose process died.
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "eval": {},
                "metrics": {},
            }

    def finish(self, name: str, metrics: dict[str, Any] | None = None) -> None:
        with self._update():
            entry = self.stages[name]
            entry["status"] = "done"
            entry["ended"] = now()
            if metrics:
                entry["metrics"].update(metrics)

    def fail(self, name: str, error: str) -> None:
        with self._update():
            entry = self.stages.get(name)
            if entry is None:
                return
            entry["status"] = "failed"
            entry["ended"] = now()
            entry["error"] = error

    def restore(self, name: str, entry: dict[str, Any] | None, created: bool) -> None:
        """Put stage `name` back as it was before `begin` (`entry`; None: absent).

        For a stage that stopped on a user mistake before it trained: the run must read as if
        it had not started. `created`: this attempt created the manifest file, so it goes again
        if nothing else was recorded meanwhile.
        """
        with self._update():
            if entry is None:
                self.stages.pop(name, None)
            else:
                self.stages[name] = entry
        if created and not self.stages:
            self.path.unlink(missing_ok=True)
            (self.run_dir / "manifest.json.lock").unlink(missing_ok=True)

    def recipe(self, name: str) -> dict[str, Any]:
        """The recipe values stage `name` ran with (from its plan)."""
        return (self.stage(name) or {}).get("plan", {}).get("recipe", {})

    def set_eval(self, name: str, suite: str, results: dict[str, dict[str, float]]) -> None:
        """Store `results[task] = {"pass@1": ...}` at `stages.<name>.eval.<suite>`."""
        with self._update():
            self.stages[name].setdefault("eval", {})[suite] = results
