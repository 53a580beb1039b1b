"""The sandbox's fork server: a warm interpreter that forks one fresh child per execution.

`pool.py` starts it as `python -I -S server.py ROOT drop-uid|keep-uid` with an empty environment and, where the OS
allows, inside a network namespace of its own (no interface but a downed loopback). It imports
the modules programs commonly use once, then serves length-prefixed JSON requests on stdin: a
fork costs about a millisecond, where a fresh interpreter costs 30-85 ms.

Each child, before any of the program runs:
- gets a new session and process group (a timeout kills the whole group), a fresh directory
  under ROOT as its working directory, stdin on /dev/null, stdout and stderr into a file there;
- closes every other descriptor but the verdict pipe (so it cannot write to this server's
  protocol pipes);
- gets hard limits on CPU time, address space, file size (caps its output), open files and
  processes (none: no fork, no thread), and no core dumps;
- drops to uid/gid `nobody` when the server runs as root;
- installs the harness's audit hook, then runs the program and its tests, or a tool call's
  cell after the rollout's earlier cells (`harness.py`).

Only stdlib; nothing here trusts the child. Its verdict counts only with this execution's
nonce; its exit status and output are never read.
"""

import base64
import builtins
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time

WARM = ("math", "cmath", "re", "string", "collections", "collections.abc", "itertools",
        "functools", "operator", "heapq", "bisect", "copy", "array", "fractions", "decimal",
        "statistics", "random", "datetime", "calendar", "typing", "dataclasses", "enum",
        "struct", "json", "textwrap", "unicodedata", "numbers", "queue", "hashlib", "base64",
        "io", "contextlib", "abc", "types", "weakref", "pprint", "difflib", "time")
NOBODY = 65534
VERDICT_CAP = 4096        # bytes read from the verdict pipe; a flood past this is ignored
FRAME = struct.Struct(">I")


def read_frame(stream):
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    return json.loads(stream.read(FRAME.unpack(head)[0]))


def write_frame(stream, obj):
    data = json.dumps(obj).encode()
    stream.write(FRAME.pack(len(data)) + data)
    stream.flush()


def vm_bytes():
    """This process's address space, which every child starts with (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def stdlib_open_to_nobody():
    """Can uid `nobody` read the standard library (every parent directory searchable)? If not,
    a child that drops to it can import only what this server preloaded."""
    path = os.path.dirname(os.__file__)
    while True:
        if not os.stat(path).st_mode & 0o001:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def child(job, home, verdict_fd, nonce, harness, drop_uid, base_vm):
    """Confine this forked child, then hand it to the harness (which never returns)."""
    os.setsid()
    os.chdir(home)
    null = os.open("/dev/null", os.O_RDONLY)
    out = os.open("output", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.closerange(3, verdict_fd)
    os.closerange(verdict_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    cpu = int(job["timeout"]) + 1
    memory = base_vm + int(job["memory_mb"]) * 2**20
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, int(job["output_kb"]) * 1024),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 1),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    if drop_uid:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    os.environ.clear()
    os.environ.update(HOME=home, TMPDIR=home)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if job.get("mode") == "cell":
        harness["run_cell"](job["history"], job["cell"], nonce, verdict_fd, home,
                            int(job["output_chars"]))
    harness["run"](job["program"], job["imports"], job["tests"], nonce, verdict_fd, home)


def execute(job, root, harness, drop_uid, base_vm):
    """Fork, confine and wait for one execution; its verdict, or why there is none."""
    home = os.path.join(root, os.urandom(8).hex())
    os.mkdir(home, 0o700)
    if drop_uid:
        os.chown(home, NOBODY, NOBODY)
    nonce = os.urandom(16).hex().encode()
    read_end, write_end = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            child(job, home, write_end, nonce, harness, drop_uid, base_vm)
        finally:
            os._exit(1)
    os.close(write_end)
    buf, timed_out = b"", False
    cap = VERDICT_CAP + 2 * int(job.get("output_chars", 0)) * 4  # a cell's base64 output
    deadline = start + float(job["timeout"])
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if not select.select([read_end], [], [], left)[0]:
            continue
        chunk = os.read(read_end, 65536)
        if not chunk:
            break  # the child is gone (or closed the pipe: it cannot write a verdict then)
        buf = (buf + chunk)[:cap]
    os.close(read_end)
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever is left of the group, every time
    except (ProcessLookupError, PermissionError):
        pass
    os.waitpid(pid, 0)
    seconds = time.monotonic() - start
    shutil.rmtree(home, ignore_errors=True)
    if job.get("mode") == "cell":
        return cell_result(buf, nonce, seconds, timed_out)
    verdict = None
    for line in buf.split(b"\n"):
        parts = line.split()
        if len(parts) == 4 and parts[0] == b"VERDICT" and parts[1] == nonce:
            verdict = (int(parts[2]), int(parts[3]))
    if verdict is None:
        return {"passed": 0, "total": len(job["tests"]), "seconds": seconds,
                "status": "timeout" if timed_out else "no_verdict"}
    return {"passed": verdict[0], "total": verdict[1], "seconds": seconds, "status": "ok"}


def cell_result(buf, nonce, seconds, timed_out):
    """A tool call's outcome from the child's result line (only one with this run's nonce)."""
    for line in buf.split(b"\n"):
        parts = line.split(b" ")
        if len(parts) == 5 and parts[0] == b"RESULT" and parts[1] == nonce:
            try:
                output, error = (base64.b64decode(x).decode("utf-8", "replace") for x in parts[3:])
            except ValueError:
                break
            return {"status": "ok" if parts[2] == b"ok" else "error", "output": output,
                    "error": error, "seconds": seconds}
    return {"status": "timeout" if timed_out else "no_result", "output": "", "error": "",
            "seconds": seconds}


def main():
    root = sys.argv[1]
    for name in WARM:
        __import__(name)
    harness_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
    with open(harness_path) as f:
        source = f.read()
    # A private namespace with private builtins: unreachable from the programs (see harness.py).
    env = {"__name__": "posttrain_sandbox_harness", "__builtins__": dict(builtins.__dict__)}
    exec(compile(source, harness_path, "exec"), env)
    harness = {"run": env["run"], "run_cell": env["run_cell"]}
    del env
    drop_uid = os.geteuid() == 0 and sys.argv[2:3] != ["keep-uid"]
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = None
    write_frame(sys.stdout.buffer, {
        "netns": netns, "uid": NOBODY if drop_uid else os.geteuid(), "drop_uid": drop_uid,
        "imports": "preloaded only" if drop_uid and not stdlib_open_to_nobody() else "stdlib",
        "pid": os.getpid()})
    base_vm = vm_bytes()
    while True:
        job = read_frame(sys.stdin.buffer)
        if job is None:
            return
        write_frame(sys.stdout.buffer, execute(job, root, harness, drop_uid, base_vm))


if __name__ == "__main__":
    main()
