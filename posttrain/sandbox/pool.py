"""The trainer's side of the sandbox: a pool of fork servers, one per core, and the jobs it runs.

Why not a hosted sandbox: the R1 recipe rewards code by running it, and a user wants that on a
laptop or a GPU node with nothing else installed. The isolation itself lives in `server.py`
(OS limits, uid, namespace) and `harness.py` (verdict, audit hook); this module only starts the
servers, feeds them jobs in parallel and restarts one that dies.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

__all__ = ["Cell", "CellResult", "Job", "Verdict", "Sandbox", "shared", "release_shared"]

log = logging.getLogger("posttrain.sandbox")
SERVER = Path(__file__).with_name("server.py")
FRAME = struct.Struct(">I")
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000


@dataclass(frozen=True)
class Job:
    """One execution: a program, the import lines its tests need, and the tests (statements,
    normally one `assert` each)."""

    program: str
    tests: Sequence[str]
    imports: Sequence[str] = ()


@dataclass(frozen=True)
class Verdict:
    """What an execution earned. `status`: ok (the harness reported), timeout, no_verdict (the
    program exited, crashed or was killed before the harness could report), skipped (the call's
    time budget ran out first), error (the server failed)."""

    passed: int
    total: int
    status: str
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


@dataclass(frozen=True)
class Cell:
    """One tool call: a cell of Python and the rollout's earlier cells, run again first (their
    output discarded) to rebuild the state the new cell sees."""

    code: str
    history: Sequence[str] = ()


@dataclass(frozen=True)
class CellResult:
    """What a tool call gave back. `status`: ok, error (the cell raised: `error` holds its last
    line), timeout, no_result (it exited or was killed before reporting), skipped (the time
    budget ran out first), failed (the server failed)."""

    status: str
    output: str = ""
    error: str = ""
    seconds: float = 0.0


def _enter_network_namespace() -> None:
    """Runs in the forked server before exec: a network namespace of its own (as root), else an
    unprivileged user+network namespace; where neither is allowed the audit hook's socket ban is
    what remains (reported in `Sandbox.protections`)."""
    unshare = getattr(os, "unshare", None)
    for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET):
        try:
            if unshare is not None:
                unshare(flags)
                return
            if _libc() is not None and _libc().unshare(flags) == 0:
                return
        except OSError:
            continue


@functools.cache
def _libc():
    """libc, for unshare(2) before Python 3.12 (None where not needed or not found)."""
    if hasattr(os, "unshare") or not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None




class _Server:
    """One fork server process and its pipes; restarted when it dies or stops answering."""

    def __init__(self, root: str, isolate_network: bool, drop_uid: bool):
        self.root, self.isolate_network, self.drop_uid = root, isolate_network, drop_uid
        self.proc: subprocess.Popen | None = None
        self.hello: dict = {}

    def start(self) -> None:
        _libc()  # loaded here, not in the forked child (no imports between fork and exec)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(SERVER), self.root, "drop-uid" if self.drop_uid else
             "keep-uid"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={}, cwd=self.root,
            close_fds=True, preexec_fn=_enter_network_namespace
            if self.isolate_network and sys.platform.startswith("linux") else None)
        self.hello = self._read(timeout=60.0) or {}
        if not self.hello:
            self.stop()
            raise RuntimeError("sandbox: the fork server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                pipe.close()
            self.proc = None

    def _read(self, timeout: float) -> dict | None:
        out = self.proc.stdout
        if not select.select([out], [], [], timeout)[0]:
            return None
        head = out.read(FRAME.size)
        if len(head) < FRAME.size:
            return None
        return json.loads(out.read(FRAME.unpack(head)[0]))

    def request(self, request: dict, timeout: float) -> dict | None:
        """One execution on this server; None when it died or hung (it is restarted)."""
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self.start()
        data = json.dumps(request).encode()
        try:
            self.proc.stdin.write(FRAME.pack(len(data)) + data)
            self.proc.stdin.flush()
            reply = self._read(timeout + 10.0)
        except (OSError, ValueError):
            reply = None
        if reply is None:  # the server died or hung: a fresh one for the next job
            log.warning("sandbox: a fork server stopped answering; restarting it")
            self.stop()
        return reply

    def execute(self, job: Job, timeout: float, memory_mb: int, output_kb: int) -> Verdict:
        reply = self.request({"program": job.program, "tests": list(job.tests),
                              "imports": list(job.imports), "timeout": timeout,
                              "memory_mb": memory_mb, "output_kb": output_kb}, timeout)
        if reply is None:
            return Verdict(0, len(job.tests), "error")
        return Verdict(reply["passed"], reply["total"], reply["status"], reply["seconds"])

    def execute_cell(self, cell: Cell, timeout: float, memory_mb: int, output_kb: int,
                     output_chars: int) -> CellResult:
        reply = self.request({"mode": "cell", "cell": cell.code, "history": list(cell.history),
                              "timeout": timeout, "memory_mb": memory_mb, "output_kb": output_kb,
                              "output_chars": output_chars}, timeout)
        if reply is None:
            return CellResult("failed")
        return CellResult(reply["status"], reply["output"], reply["error"], reply["seconds"])


class Sandbox:
    """A pool of fork servers that runs jobs in parallel, one per server.

    Args:
        workers: Servers (parallel executions); default: the cores this process may use,
            shared among the ranks on this machine.
        timeout: Wall-clock seconds per execution (the CPU limit is one more).
        memory_mb: Address space each execution may add to the server's.
        output_kb: Largest file an execution may write, its stdout/stderr included.
        isolate_network, drop_uid: Turn off the network namespace / the switch to uid `nobody`
            (which needs root); the tests do, to check what holds on a machine without them.
    """

    def __init__(self, workers: int | None = None, timeout: float = 3.0, memory_mb: int = 512,
                 output_kb: int = 1024, *, isolate_network: bool = True, drop_uid: bool = True):
        if workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            workers = max(1, (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        self.timeout, self.memory_mb, self.output_kb = float(timeout), int(memory_mb), int(output_kb)
        self._root = tempfile.TemporaryDirectory(prefix="posttrain-sandbox-")
        os.chmod(self._root.name, 0o711)  # `nobody` must reach its own directory inside
        self._servers = [_Server(self._root.name, isolate_network, drop_uid)
                         for _ in range(workers)]
        self._free: Queue[_Server] = Queue()
        self._lock = threading.Lock()
        self._started = False
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="sandbox")

    @property
    def workers(self) -> int:
        return len(self._servers)

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            for server in self._servers:
                server.start()
                self._free.put(server)
            self._started = True
        log.info("sandbox: %s", self.describe())

    def protections(self) -> dict[str, object]:
        """What confines the executions on this machine (as the first server reported it)."""
        self._start()
        hello = self._servers[0].hello
        try:
            own = os.readlink("/proc/self/ns/net")
        except OSError:
            own = None
        isolated = hello.get("netns") is not None and hello.get("netns") != own
        return {"network": "own network namespace" if isolated else "audit hook denies sockets",
                "uid": hello.get("uid"), "imports": hello.get("imports"),
                "limits": f"cpu {int(self.timeout) + 1}s, +{self.memory_mb} MiB, "
                          f"files {self.output_kb} KiB, no processes"}

    def describe(self) -> str:
        """The protections in one line (logged once when the servers start)."""
        p = self.protections()
        return (f"{self.workers} fork server(s); network: {p.get('network')}; uid {p.get('uid')};"
                f" imports: {p.get('imports')}; limits: {p.get('limits')}")

    def _one(self, job: Job, deadline: float | None) -> Verdict:
        if not job.tests:
            return Verdict(0, 0, "ok")
        server = self._free.get()
        try:
            timeout = self.timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0.05:
                    return Verdict(0, len(job.tests), "skipped")
            return server.execute(job, timeout, self.memory_mb, self.output_kb)
        finally:
            self._free.put(server)

    def _one_cell(self, cell: Cell, deadline: float | None, timeout: float, memory_mb: int,
                  output_chars: int) -> CellResult:
        server = self._free.get()
        try:
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0.05:
                    return CellResult("skipped")
            return server.execute_cell(cell, timeout, memory_mb, self.output_kb, output_chars)
        finally:
            self._free.put(server)

    def run_cells(self, cells: Sequence[Cell], budget_s: float | None = None,
                  timeout: float | None = None, memory_mb: int | None = None,
                  output_chars: int = 2000) -> list[CellResult]:
        """Results of tool-call `cells`, in order, at most `output_chars` of output each, each
        cell within `timeout` seconds and `memory_mb` (default: the sandbox's). With `budget_s`,
        no cell runs past that many seconds from now (later ones are `skipped`)."""
        self._start()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        timeout = self.timeout if timeout is None else float(timeout)
        memory_mb = self.memory_mb if memory_mb is None else int(memory_mb)
        return list(self._executor.map(
            lambda c: self._one_cell(c, deadline, timeout, memory_mb, output_chars), cells))

    def run(self, jobs: Sequence[Job], budget_s: float | None = None) -> list[Verdict]:
        """Verdicts for `jobs`, in order. With `budget_s`, no job runs past that many seconds
        from now: a job whose turn comes later is `skipped` (scored 0)."""
        self._start()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        return list(self._executor.map(lambda j: self._one(j, deadline), jobs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for server in self._servers:
            server.stop()
        self._root.cleanup()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED: Sandbox | None = None


def shared(timeout: float = 3.0, memory_mb: int = 512) -> Sandbox:
    """The process's sandbox, started on first use (the code reward and the code eval share it);
    `release_shared()` stops its servers. A different timeout or memory limit makes a new one."""
    global _SHARED
    if _SHARED is not None and (_SHARED.timeout, _SHARED.memory_mb) != (float(timeout), memory_mb):
        release_shared()
    if _SHARED is None:
        _SHARED = Sandbox(timeout=timeout, memory_mb=memory_mb)
    return _SHARED


def release_shared() -> None:
    """Stop the shared sandbox's servers (safe to call when there is none)."""
    global _SHARED
    if _SHARED is not None:
        _SHARED.close()
        _SHARED = None


atexit.register(release_shared)
