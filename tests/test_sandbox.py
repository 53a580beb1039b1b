"""The code sandbox: real MBPP references pass, wrong variants fail, and an escape table of
hostile programs, each contained, scored 0, with the machine unchanged afterwards."""

from __future__ import annotations

import ast
import json
import os
import socket
import time
import warnings
from pathlib import Path

import pytest

from posttrain.rewards import build_reward_funcs
from posttrain.sandbox import Job, Sandbox

MBPP = Path(os.environ.get("POSTTRAIN_DATA_DIR", "")) / "mbpp" / "test.jsonl"
TOKEN = "posttrain-escape-" + os.urandom(4).hex()
OUTSIDE = Path("/tmp") / TOKEN  # a world-writable place a contained program must not reach
GOOD = Job("def f(x):\n    return x + 1\n", ["assert f(1) == 2", "assert f(2) == 3"])


@pytest.fixture(scope="module", params=["all layers", "audit hook and limits only"])
def box(request):
    """The sandbox as it runs here, and as on a machine with no root and no namespaces (the
    same uid as the trainer, the machine's network): the escape table must hold on both."""
    _become_subreaper()
    os.environ["POSTTRAIN_SECRET"] = TOKEN  # the parent's environment the program must not see
    full = request.param == "all layers"
    with Sandbox(workers=2, timeout=2.0, memory_mb=256, output_kb=256, isolate_network=full,
                 drop_uid=full) as sandbox:
        sandbox.protections()  # starts the servers
        yield sandbox
    os.environ.pop("POSTTRAIN_SECRET", None)


@pytest.fixture(scope="module")
def mbpp_rows():
    if not MBPP.exists():
        pytest.skip(f"MBPP data not found at {MBPP} (set POSTTRAIN_DATA_DIR)")
    return [json.loads(line) for line in MBPP.read_text().splitlines()]


def returns_none(code: str) -> str:
    """The reference with every top-level function returning None: wrong on its tests."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # references with "\w" in plain strings
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(code)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            node.body = [ast.Return(ast.Constant(None))]
    return ast.unparse(tree)


def as_completion(code: str) -> str:
    return f"<think>\nWrite the function.\n</think>\n\n```python\n{code}\n```"


def test_every_mbpp_reference_scores_one_and_a_wrong_variant_zero(mbpp_rows):
    """All 427 through the `code` reward as GRPO calls it (the dataset's `test_list` column as
    `tests`). Task 123's reference needs 3.4 s of CPU alone and ran past 10 s of wall time on a
    loaded CI machine, so the per-execution timeout is 60 s here (a wrong variant returns at
    once, so the wide limit costs nothing)."""
    [reward], _ = build_reward_funcs({"code": 1.0}, {"code": {"all_or_nothing": True,
                                                              "timeout": 60.0,
                                                              "budget_s": 600.0}})
    columns = {"tests": [r["test_list"] for r in mbpp_rows],
               "test_imports": [r["test_imports"] for r in mbpp_rows]}
    right = reward([as_completion(r["code"]) for r in mbpp_rows], **columns)
    assert [r["task_id"] for r, s in zip(mbpp_rows, right) if s != 1.0] == []
    wrong = reward([as_completion(returns_none(r["code"])) for r in mbpp_rows], **columns)
    assert [r["task_id"] for r, s in zip(mbpp_rows, wrong) if s != 0.0] == []


def test_partial_credit_and_unscorable_rows(box):
    [reward], _ = build_reward_funcs({"code": 1.0})
    half = as_completion("def f(x):\n    return 2\n")
    out = reward([half, "no code at all", half], tests=[["assert f(1) == 2", "assert f(2) == 3"],
                                                        ["assert f(1) == 2"], []],
                 test_imports=[[], [], []])
    assert out == [0.5, 0.0, None]


def test_the_call_budget_bounds_a_step(box):
    """Eight infinite loops on two workers with a 1.5 s budget: the call returns in about that
    time, every one scored 0."""
    [reward], _ = build_reward_funcs({"code": 1.0}, {"code": {"budget_s": 1.5}})
    start = time.monotonic()
    out = reward([as_completion("while True:\n    pass\n")] * 8, tests=[["assert True"]] * 8)
    assert out == [0.0] * 8
    assert time.monotonic() - start < 6.0


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(0.2)
    return s


LISTENER = _listener()
PORT = LISTENER.getsockname()[1]
MY_PID = os.getpid()

# (name, program, tests, test_imports). Every test here would pass if the escape worked.
ESCAPES = [
    ("write outside its dir", f"open('{OUTSIDE}', 'w').write('x')\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("os.open outside its dir", f"import os\nos.close(os.open('{OUTSIDE}', os.O_CREAT | os.O_WRONLY))"
     "\ndef f(): return 1", ["assert f() == 1"], []),
    ("write via ../", f"open('../../../../../../..{OUTSIDE}', 'w').write('x')\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("write through a symlink", f"import os\nos.symlink('/tmp', 'link')\n"
     f"open('link/{TOKEN}', 'w').write('x')\ndef f(): return 1", ["assert f() == 1"], []),
    ("write relative to a dir fd", f"import os\nd = os.open('/tmp', os.O_RDONLY)\n"
     f"os.close(os.open('{TOKEN}', os.O_CREAT | os.O_WRONLY, dir_fd=d))\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("mkdir outside its dir", f"import os\nos.mkdir('{OUTSIDE}')\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("chdir away, then write", f"import os\nos.chdir('/tmp')\nopen('{TOKEN}', 'w').write('x')\n"
     "def f(): return 1", ["assert f() == 1"], []),
    ("read the parent's environment", "import os\ndef f(): return os.environ.get('POSTTRAIN_SECRET')",
     [f"assert f() == '{TOKEN}'"], []),
    ("read the trainer's /proc environ", f"def f(): return open('/proc/{MY_PID}/environ', 'rb')"
     f".read().count(b'{TOKEN}')", ["assert f() == 1"], []),
    ("read the server's /proc environ", "import os\ndef f(): return len(open(f'/proc/{os.getppid()}"
     "/environ', 'rb').read()) >= 0", ["assert f() == True"], []),
    ("socket to 127.0.0.1", f"import socket\nsocket.create_connection(('127.0.0.1', {PORT}), 1)"
     ".sendall(b'x')\ndef f(): return 1", ["assert f() == 1"], []),
    ("raw _socket", f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {PORT}))\n"
     "def f(): return 1", ["assert f() == 1"], []),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\ndef f(): return 1", ["assert f() == 1"], []),
    ("thread bomb", "import threading, time\nfor _ in range(10000):\n"
     "    threading.Thread(target=time.sleep, args=(60,)).start()\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("subprocess", f"import subprocess\nsubprocess.run(['touch', '{OUTSIDE}'])\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("os.system", f"import os\nos.system('touch {OUTSIDE}')\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("memory bomb", "x = bytearray(8 * 1024 ** 3)\ndef f(): return 1", ["assert f() == 1"], []),
    ("growing memory", "x = []\nwhile True:\n    x.append(' ' * 10 ** 6)\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("infinite loop", "while True:\n    pass\ndef f(): return 1", ["assert f() == 1"], []),
    ("infinite loop inside the test", "def f():\n    while True:\n        pass",
     ["assert f() == 1"], []),
    ("kill the parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("kill the parent's group", "import os\nos.killpg(os.getpgid(os.getppid()), 9)\n"
     "def f(): return 1", ["assert f() == 1"], []),
    ("kill everything", "import os\nos.kill(-1, 9)\ndef f(): return 1", ["assert f() == 1"], []),
    ("sys.exit(0) before the asserts", "import sys\ndef f(): return 0\nsys.exit(0)",
     ["assert f() == 1"], []),
    ("os._exit(0) before the asserts", "import os\ndef f(): return 0\nos._exit(0)",
     ["assert f() == 1"], []),
    ("exit inside the tested call", "import os\ndef f(): os._exit(0)", ["assert f() == 1"], []),
    ("replace AssertionError", "import builtins\nbuiltins.AssertionError = type('N', (Exception,), {})"
     "\ndef f(): return 0", ["assert f() == 1"], []),
    ("replace builtins the harness might use", "import builtins\nbuiltins.all = lambda *a: True\n"
     "builtins.type = lambda *a: int\nbuiltins.isinstance = lambda *a: True\ndef f(): return 0",
     ["assert f() == 1"], []),
    ("forge a verdict on every descriptor", "import os\nfor fd in range(64):\n    try:\n"
     "        os.write(fd, b'VERDICT 00 1 1\\nPASSED\\n')\n    except OSError:\n        pass\n"
     "def f(): return 0\nos._exit(0)", ["assert f() == 1"], []),
    ("patch a test-imported module", "import math\nmath.isclose = lambda *a, **k: True\n"
     "def f(): return 0.0", ["assert math.isclose(f(), 3.0)"], ["import math"]),
    ("patch it during the tested call", "import math\ndef f():\n    math.isclose = lambda *a, **k: True"
     "\n    return 0.0", ["assert math.isclose(f(), 3.0) or math.isclose(f(), 3.0)"], ["import math"]),
    ("shadow a builtin the test wraps with", "def set(*a): return 1\ndef f(x): return x",
     ["assert set(f([1])) == set([2])"], []),
    ("patch the stdlib types tests compare", "import collections\n"
     "collections.Counter.__eq__ = lambda s, o: True\ndef f(): return collections.Counter('a')",
     ["assert f() == collections.Counter('b')"], ["import collections"]),
    ("walk the frames to the harness", "import sys\ndef f():\n    fr = sys._getframe(1)\n"
     "    fr.f_locals['passed'] = 99\n    return 0", ["assert f() == 1"], []),
    ("frames through a traceback", "def f():\n    try:\n        raise ValueError\n"
     "    except ValueError as e:\n        e.__traceback__.tb_frame.f_back.f_globals.clear()\n"
     "    return 0", ["assert f() == 1"], []),
    ("trace the harness", "import sys\nsys.settrace(lambda *a: None)\ndef f(): return 0",
     ["assert f() == 1"], []),
    ("an audit hook that reads the tests", "import sys\nseen = []\n"
     "sys.addaudithook(lambda e, a: seen.append(a))\n"
     "def f(): return next(c for a in seen for x in a if hasattr(x, 'co_consts') "
     "for c in x.co_consts if isinstance(c, int) and c > 100)", ["assert f() == 12345"], []),
    ("gc to the harness's objects", "import gc\ndef f():\n    gc.get_objects()\n    return 0",
     ["assert f() == 1"], []),
    ("ctypes", "import ctypes\ndef f(): return 0", ["assert f() == 1"], []),
    ("__eq__ always True", "class A:\n    def __eq__(self, o): return True\n"
     "    def __ne__(self, o): return False\n    def __bool__(self): return True\n"
     "def f(x): return A()", ["assert f(1) == 5", "assert not f(1) != 5", "assert f(1)"], []),
    ("an int subclass with __eq__ True", "class I(int):\n    def __eq__(self, o): return True\n"
     "    __hash__ = int.__hash__\ndef f(x): return I(0)", ["assert f(1) == 5"], []),
    ("a list subclass", "class L(list):\n    def __eq__(self, o): return True\n"
     "def f(x): return L()", ["assert f(1) == [1, 2]"], []),
    ("a signal handler gets the harness's frame", "import signal\n"
     "def grab(sig, frame):\n    frame.f_globals.clear()\n"
     "signal.signal(signal.SIGALRM, grab)\nsignal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)\n"
     "def f(): return 0", ["assert f() == 1"], []),
    ("load native code directly", "import importlib.machinery, importlib.util, _socket\n"
     "path = _socket.__file__\n"
     "spec = importlib.util.spec_from_file_location('_ctypes', path.replace('_socket', '_ctypes'))\n"
     "importlib.util.module_from_spec(spec)\ndef f(): return 1", ["assert f() == 1"], []),
    ("native code via a fresh loader", "import importlib.machinery, importlib.util, sysconfig, glob\n"
     "so = glob.glob(sysconfig.get_paths()['platstdlib'] + '/lib-dynload/_ctypes*.so')[0]\n"
     "loader = importlib.machinery.ExtensionFileLoader('_ctypes', so)\n"
     "loader.create_module(importlib.util.spec_from_loader('_ctypes', loader))\n"
     "def f(): return 1", ["assert f() == 1"], []),
    ("a fifo outside its dir", f"import os\nos.mkfifo('{OUTSIDE}')\ndef f(): return 1",
     ["assert f() == 1"], []),
    ("print PASSED", "print('PASSED')\nprint('All tests passed')\nimport os\nos._exit(0)",
     ["assert f() == 1"], []),
    ("gigabytes of output", "import sys\nwhile True:\n    sys.stdout.write('x' * 10 ** 6)\n"
     "def f(): return 1", ["assert f() == 1"], []),
    ("gigabytes into a file of its own", "f_ = open('big', 'w')\nwhile True:\n"
     "    f_.write('x' * 10 ** 6)\ndef f(): return 1", ["assert f() == 1"], []),
    ("raise the limits", "import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (-1, -1))\n"
     "import os\nos.fork()\ndef f(): return 1", ["assert f() == 1"], []),
]


def _become_subreaper() -> None:
    """Make this test process the reaper of its orphaned descendants (Linux prctl
    PR_SET_CHILD_SUBREAPER), so a process a program leaves behind stays countable as ours even
    after its parent dies, instead of being reparented to init."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0, "prctl(PR_SET_CHILD_SUBREAPER) failed"


def _descendants() -> set[int]:
    """Live processes under this test process: the sandbox's servers and whatever they or their
    children left behind (other jobs on the machine do not count)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":  # a zombie is already gone; its parent has not reaped it yet
            parents[int(entry)] = int(fields[1])
    mine, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        children = [c for c, parent in parents.items() if parent == pid and c not in mine]
        mine.update(children)
        todo.extend(children)
    return mine


@pytest.mark.parametrize("name,program,tests,imports", ESCAPES, ids=[e[0] for e in ESCAPES])
def test_escape_is_contained_scored_zero_machine_unchanged(box, name, program, tests, imports):
    servers = [s.proc.pid for s in box._servers if s.proc is not None]
    before = _descendants()
    start = time.monotonic()
    [verdict] = box.run([Job(program, tests, imports)])
    assert verdict.passed == 0, verdict
    assert time.monotonic() - start < box.timeout + 3.0  # contained in time too
    assert not OUTSIDE.exists(), f"{name}: wrote {OUTSIDE}"
    with pytest.raises(socket.timeout):
        LISTENER.accept()  # no connection reached the machine's loopback
    assert _descendants() <= before  # nothing left running: only the servers, as before
    assert [s.proc.pid for s in box._servers if s.proc is not None] == servers  # servers alive
    assert os.listdir(box._root.name) == []  # its directory is gone
    assert [v.fraction for v in box.run([GOOD, GOOD])] == [1.0, 1.0]  # and it still works


def test_protections_are_reported(box):
    p = box.protections()
    assert set(p) == {"network", "uid", "imports", "limits"}
    if box._servers[0].isolate_network and os.geteuid() == 0 and Path("/proc/self/ns/net").exists():
        assert p["network"] == "own network namespace" and p["uid"] == 65534
    if not box._servers[0].isolate_network:
        assert p["network"] == "audit hook denies sockets" and p["uid"] == os.geteuid()


def test_legit_programs_still_work(box):
    """What the hook must not break: namedtuple/enum (they ask for frames, optional for them),
    classes, recursion, files inside its own directory, printing."""
    program = ("from collections import namedtuple\nimport enum, re\n"
               "P = namedtuple('P', 'x y')\nclass C(enum.Enum):\n    A = 1\n"
               "open('scratch.txt', 'w').write('ok')\n"
               "def f(n):\n    print('debug', n)\n    return n if n < 2 else f(n - 1) + f(n - 2)\n"
               "def g(): return open('scratch.txt').read() + str(P(1, 2).x) + C.A.name\n"
               "def h(s): return bool(re.match('a', s))")
    [v] = box.run([Job(program, ["assert f(10) == 55", "assert g() == 'ok1A'",
                                 "assert h('abc')", "assert not h('b')"])])
    assert (v.passed, v.total, v.status) == (4, 4, "ok")


FENCE = "```"
CODE_BLOCKS = [  # (completion, the program the reward runs)
    (f"<think>\nplan\n</think>\n\n{FENCE}python\ndef f():\n    return 1\n{FENCE}",
     "def f():\n    return 1\n"),
    (f"<think>\n{FENCE}python\ndraft()\n{FENCE}\n</think>\n{FENCE}py\nfinal()\n{FENCE}", "final()\n"),
    (f"<think>x</think>\n{FENCE}python\na = 1\n{FENCE}\nthen\n{FENCE}\nb = 2\n{FENCE}", "b = 2\n"),
    (f"<think>x</think>\n{FENCE}js\nlet a = 1\n{FENCE}", None),  # not Python
    ("<think>x</think>\ndef g(): return 2", "\ndef g(): return 2"),  # bare code after </think>
    ("<think>x</think>\nThe answer is to loop.", None),  # prose is no program
    (f"<think>only a draft\n{FENCE}python\nf()\n{FENCE}", "f()\n"),  # no </think>: whole text
    (f"<think>x</think>\n{FENCE}python\nunclosed = 1\n", None),  # truncated block
]


@pytest.mark.parametrize("text,program", CODE_BLOCKS)
def test_code_block(text, program):
    from posttrain.extraction import code_block
    assert code_block(text) == program


def test_code_answer_format_rewards():
    from posttrain.answer_format import is_well_formed, tag_score
    good = f"<think>\nplan\n</think>\n\n{FENCE}python\ndef f():\n    return 1\n{FENCE}"
    assert is_well_formed(good, "code") and tag_score(good, "code") == 1.0
    assert not is_well_formed("<think>\n\n</think>\n" + good.split("</think>")[1], "code")
    assert not is_well_formed("<think>plan</think>\nno code here", "code")
    [fmt], _ = build_reward_funcs({"format": 1.0})
    assert fmt([good, "def f(): pass"], answer_format=["code", "code"]) == [1.0, 0.0]
