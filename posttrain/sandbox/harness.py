"""The in-sandbox half: run one program, then its tests, and write the verdict; or run one cell
of a tool call and write what it printed.

`server.py` loads this file into a private namespace (not a module, not in `sys.modules`, with
its own copy of the builtins) before any program runs, and calls `run` in each forked child once
the child's limits are set. Everything `run` touches after the program starts was bound at load
time: it never looks up an attribute of a shared module again, so a program that patches `os`,
`posixpath` or `builtins` changes nothing here.

Why a pass cannot be forged:
- The verdict is one line carrying a nonce the server drew before forking. The program cannot
  read it: the audit hook denies frames (`sys._getframe`, `tb_frame`, `gi_frame`...), tracing,
  gc introspection, new audit hooks, ctypes and /proc. A line the program writes to any
  descriptor lacks the nonce and is ignored.
- No verdict (an exit, crash, kill or timeout) scores 0. The server never reads an exit code or
  the program's output.
- Each assert is taken apart here: its operands are evaluated one by one and compared by this
  code, and each must be plain built-in data (exact types, recursively). An object whose
  `__eq__` always says True is not plain, so that test fails.
- Tests see the real builtins, and the modules their imports bound before the program ran. A
  test fails if the program changed one of those modules. A builtin name the program redefines
  is visible to a test only when it is the function under test (MBPP's `sum` task), not when it
  wraps one (`set(f(x)) == set(...)`).

The audit hook is the second wall: the OS limits set by the server (uid, rlimits, network
namespace, process group) hold even against code that gets past it.

A tool call (`run_cell`) runs under the same hook and limits: the rollout's earlier cells are run
again first, their output discarded (that is how a variable set in one call is there in the
next: the state is rebuilt, never kept in a process between calls, so nothing crosses from one
rollout to another), with `random` seeded alike each time; then the new cell runs with its
output captured, a last bare expression printed as a REPL would. The result line carries the
nonce too, so the program cannot pass off output of its own as the result.
"""

import ast
import builtins
import sys as _sys
from binascii import b2a_base64
from collections import Counter, OrderedDict, defaultdict, deque
from decimal import Decimal
from fractions import Fraction
from io import StringIO
from operator import contains, eq, ge, gt, is_, is_not, le, lt, ne
from os import O_APPEND, O_CREAT, O_RDWR, O_TRUNC, O_WRONLY, _exit, fspath, lstat, readlink
from os import stat as os_stat
from os import write as os_write
from random import seed as seed_random
from re import Match
from stat import S_ISDIR, S_ISLNK
from sys import addaudithook, modules

BUILTINS = dict(builtins.__dict__)  # the tests' builtins: a copy the program cannot reach
# Data whose comparisons run code the program cannot override: built-in types, and the stdlib
# types tests compare with (checked untouched before and after each test, like the modules).
SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, Match, Decimal, Fraction})
MAPPINGS = frozenset({dict, Counter, OrderedDict, defaultdict})
SEQUENCES = frozenset({list, tuple, set, frozenset, deque})
STDLIB_TYPES = (Counter, OrderedDict, defaultdict, deque, Decimal, Fraction, Match)
MAX_ITEMS = 100_000  # plain-data check budget per value
WRITE_FLAGS = O_WRONLY | O_RDWR | O_APPEND | O_CREAT | O_TRUNC
READABLE_DEVICES = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"})
COMPARE = {ast.Eq: eq, ast.NotEq: ne, ast.Lt: lt, ast.LtE: le, ast.Gt: gt, ast.GtE: ge,
           ast.Is: is_, ast.IsNot: is_not, ast.In: lambda a, b: contains(b, a),
           ast.NotIn: lambda a, b: not contains(b, a)}

# Events the program may not raise at all: processes, signals to others, sockets, native code,
# and every way to reach another frame or object (which is how a nonce would leak).
DENIED = frozenset({
    "os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.startfile",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
    "os.symlink", "os.link", "os.chdir", "os.chroot", "os.setuid", "os.setgid",
    "sys._getframe", "sys._current_frames", "sys._current_exceptions", "sys.settrace",
    "sys.setprofile", "sys.addaudithook", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "mmap.__new__", "pty.spawn", "resource.prlimit", "os.unshare", "os.setns",
    "sys.monitoring.register_callback",
})
DENIED_PREFIXES = ("socket.", "ctypes.", "winreg.", "_winapi.")
DENIED_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "subprocess", "socket",
                            "_socket", "multiprocessing", "_multiprocessing", "pty", "fcntl",
                            "mmap"})
# Functions that raise no audit event and that the program has no use for: removed from their
# modules in the child. Signal handlers receive the interrupted frame (a harness frame, say);
# `create_dynamic` would load native code the hook cannot see (so only the extension modules the
# server preloaded can be imported); fifos and device nodes are files the hook cannot stop.
DISARMED = (("_signal", "signal"), ("signal", "signal"), ("_signal", "pidfd_send_signal"),
            ("signal", "pidfd_send_signal"), ("_imp", "create_dynamic"), ("posix", "mkfifo"),
            ("os", "mkfifo"), ("posix", "mknod"), ("os", "mknod"))
FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
# Filesystem changes, as (positions of paths, positions of dir_fd) in the event's arguments:
# allowed on paths inside the sandbox's directory only, never on a descriptor or a dir_fd.
MUTATING = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
            "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
            "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()), "os.chflags": ((0,), ()),
            "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "shutil.rmtree": ((0,), (1,))}


class Untrusted(Exception):
    """A value a test looks at is not trusted data: the test fails (even under `not`)."""


class Denied(RuntimeError, ValueError):
    """What the audit hook raises. Also a ValueError, because stdlib code that treats a missing
    frame as optional (`namedtuple`, `enum`, `typing`) catches that and keeps working."""


def resolve(path, cwd):
    """`path` with every symlink followed, like `os.path.realpath`, but built only from C
    functions bound before the program ran (`posixpath` is Python the program could patch)."""
    path = fspath(path)
    if isinstance(path, bytes):
        path = path.decode("utf-8", "surrogateescape")
    todo = (path if path.startswith("/") else cwd + "/" + path).split("/")[::-1]
    parts, hops = [], 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        here = "/" + "/".join(parts + [part])
        try:
            is_link = S_ISLNK(lstat(here).st_mode)
        except OSError:
            is_link = False
        if not is_link:
            parts.append(part)
            continue
        hops += 1
        if hops > 40:
            raise Denied("sandbox: too many symlinks")
        target = readlink(here)
        if target.startswith("/"):
            parts = []
        todo.extend(target.split("/")[::-1])
    return "/" + "/".join(parts)


def make_hook(home):
    """The audit hook for a child whose only writable place is `home`."""

    def inside(path):
        real = resolve(path, home)
        return real == home or real.startswith(home + "/")

    def hook(event, args):
        if event in DENIED or event.startswith(DENIED_PREFIXES):
            raise Denied(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in DENIED_IMPORTS:
            raise Denied(f"sandbox: import {args[0]} is not allowed")
        if event == "object.__getattr__" and args[1] in FRAME_ATTRS:
            raise Denied("sandbox: frame access is not allowed")
        if event == "open":
            path, flags = args[0], args[2]
            if isinstance(path, int):
                return  # an already-open descriptor: only 0, 1, 2 and the verdict pipe exist
            if flags & WRITE_FLAGS and not inside(path):
                raise Denied("sandbox: writing outside its directory is not allowed")
            real = resolve(path, home)
            if real.startswith(("/proc", "/sys", "/dev/")) and real not in READABLE_DEVICES:
                raise Denied("sandbox: /proc, /sys and devices are not readable")
            try:
                is_dir = S_ISDIR(os_stat(real).st_mode)
            except OSError:
                is_dir = False
            if is_dir:  # a directory descriptor would let dir_fd= reach outside `home`
                raise Denied("sandbox: opening a directory is not allowed")
        elif event in MUTATING:
            path_at, dir_fd_at = MUTATING[event]
            paths = [args[i] for i in path_at if i < len(args)]
            dir_fds = [args[i] for i in dir_fd_at if i < len(args)]
            if (any(isinstance(p, int) for p in paths) or any(d not in (None, -1) for d in dir_fds)
                    or not all(inside(p) for p in paths)):
                raise Denied(f"sandbox: {event} outside its directory is not allowed")

    return hook


def trusted(value):
    """`value` itself when it is trusted data all the way down (exact types, no subclasses: see
    SCALARS), so its comparisons run code the program cannot override; else Untrusted."""
    todo, seen = [value], 0
    while todo:
        v = todo.pop()
        seen += 1
        t = type(v)
        if seen > MAX_ITEMS:
            raise Untrusted("too large to check")
        if t in SCALARS:
            continue
        if t in MAPPINGS:
            todo.extend(dict.keys(v))
            todo.extend(dict.values(v))
        elif t in SEQUENCES:
            todo.extend(v)
        else:
            raise Untrusted(t.__name__)
    return value


def plan(node):
    """An assert's expression as checks run by `holds`: compiled before the program runs."""
    if isinstance(node, ast.Compare) and all(type(op) in COMPARE for op in node.ops):
        operands = [node.left, *node.comparators]
        return ("compare", [compile(ast.Expression(o), "<test>", "eval") for o in operands],
                [COMPARE[type(op)] for op in node.ops])
    if isinstance(node, ast.BoolOp):
        return ("all" if isinstance(node.op, ast.And) else "any", [plan(v) for v in node.values])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ("not", plan(node.operand))
    return ("truthy", compile(ast.Expression(node), "<test>", "eval"))


def holds(check, env):
    """Evaluate one planned check in `env`. Every value it looks at must be trusted data, or the
    whole test fails (Untrusted), also under `not`."""
    kind = check[0]
    if kind == "compare":
        values = [trusted(eval(code, env)) for code in check[1]]
        return all(op(a, b) is True for op, a, b in zip(check[2], values, values[1:]))
    if kind == "all":
        return all(holds(c, env) for c in check[1])
    if kind == "any":
        return any(holds(c, env) for c in check[1])
    if kind == "not":
        return not holds(check[1], env)
    return bool(trusted(eval(check[1], env)))


def compile_test(source):
    """A test (an assert statement, or a few statements ending in asserts) as steps; the names it
    reads, for the builtin-shadowing rule."""
    tree = ast.parse(source)
    steps = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assert):
            steps.append(("assert", plan(ast.fix_missing_locations(stmt.test))))
        else:
            module = ast.fix_missing_locations(ast.Module(body=[stmt], type_ignores=[]))
            steps.append(("exec", compile(module, "<test>", "exec")))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return steps, names


def disarm():
    """Before the program: forget the denied modules (an import is audited only when it loads)
    and remove the DISARMED functions."""
    for name in DENIED_IMPORTS:
        modules.pop(name, None)
    for module, name in DISARMED:
        if module in modules and hasattr(modules[module], name):
            delattr(modules[module], name)


def snapshot(objects):
    """Identity of every attribute of some modules and classes, to tell later if it changed."""
    return [(o, dict(o.__dict__)) for o in objects]


def untouched(snap):
    return all(len(m.__dict__) == len(d) and all(m.__dict__.get(k, d) is v for k, v in d.items())
               for m, d in snap)


def run(program, imports, tests, nonce, verdict_fd, home):
    """Run `program`, then each test; write `VERDICT <nonce> <passed> <total>` and exit. Never
    returns; any failure before the verdict means no verdict (scored 0)."""
    passed, total = 0, len(tests)
    try:
        compiled = [compile_test(t) for t in tests]
        test_imports = {}
        exec(compile("\n".join(imports), "<test_imports>", "exec"), test_imports)
        test_imports.pop("__builtins__", None)
        watched = snapshot([m for m in test_imports.values() if type(m) is type(ast)]
                           + list(STDLIB_TYPES))
        code = compile(program, "<program>", "exec")
        disarm()
        addaudithook(make_hook(home))
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        try:
            exec(code, namespace)
            loaded = True
        except BaseException:  # noqa: BLE001 - a program that raises or exits fails every test
            loaded = False
        if loaded:
            defined = {k for k in namespace if not k.startswith("__")}
            for steps, names in compiled:
                env = {**namespace, **test_imports, "__builtins__": dict(BUILTINS)}
                used = names & defined
                if used - BUILTINS.keys():  # the program's own function is under test
                    for name in used & BUILTINS.keys():
                        env[name] = BUILTINS[name]
                try:
                    ok = untouched(watched)
                    for kind, step in steps:
                        if not ok:
                            break
                        if kind == "exec":
                            exec(step, env)
                        else:
                            ok = holds(step, env)
                    ok = ok and untouched(watched)
                except BaseException:  # noqa: BLE001 - a raising test is a failed test
                    ok = False
                passed += ok is True
        os_write(verdict_fd, b"VERDICT %s %d %d\n" % (nonce, passed, total))
    finally:
        _exit(0)


def interactive(cell):
    """A cell compiled to run as a REPL does: its statements, and its last bare expression
    separately, so its value can be shown. (code, last expression code or None)."""
    tree = ast.parse(cell)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), "<cell>", "eval")
    return compile(tree, "<cell>", "exec"), last


def _b64(text):
    return b2a_base64(text.encode("utf-8", "replace"), newline=False)


def run_cell(history, cell, nonce, verdict_fd, home, output_cap):
    """Rebuild the rollout's state from its earlier cells, run `cell`, and write `RESULT <nonce>
    <ok|error> <base64 output> <base64 error line>`; never returns. A cell that does not compile
    is reported as its SyntaxError, like any other error."""
    # Plain StringIO objects (a C type): nothing defined here is reachable from the program.
    status, error, out = "ok", "", StringIO()
    try:
        try:
            earlier = [interactive(h) for h in history]
            code, last = interactive(cell)
        except SyntaxError as e:
            earlier, code, last = [], None, None
            status, error = "error", f"SyntaxError: {e.msg} (line {e.lineno})"
        disarm()
        addaudithook(make_hook(home))
        seed_random(0)
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        if code is not None:
            _sys.stdout = _sys.stderr = StringIO()  # earlier cells' output was shown already
            for h_code, h_last in earlier:
                try:
                    exec(h_code, namespace)
                    if h_last is not None:
                        eval(h_last, namespace)
                except BaseException:  # noqa: BLE001 - its error was shown when it first ran
                    pass
            _sys.stdout = _sys.stderr = out
            try:
                exec(code, namespace)
                if last is not None:
                    value = eval(last, namespace)
                    if value is not None:
                        print(repr(value))
            except BaseException as e:  # noqa: BLE001 - the model sees the error's last line
                status = "error"
                error = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) \
                    else type(e).__name__
        printed = StringIO.getvalue(out)[:output_cap]
        os_write(verdict_fd, b"RESULT %s %s %s %s\n" % (nonce, status.encode(), _b64(printed),
                                                      _b64(error[:500])))
    finally:
        _exit(0)
