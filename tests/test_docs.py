"""The README and docs/*.md cannot rot: their cheap commands run, and what they name exists.

How commands are picked: a ```console block is a transcript. Each `$ ` line is a command that is
run (cwd the repository root, `posttrain` and `python` from this venv, an empty runs dir of its
own), and the lines under it are the output it must print, `...` standing for any lines. Such a
block holds only cheap commands: `--help`, `make -n` (make's dry run; posttrain has none of its
own), a bad input. A command whose shown output is a `posttrain: error:` line must exit 2 with
exactly that line on stderr and nothing on stdout; any other must exit 0. Every command leaves
its runs dir empty.

Nothing else is run (```bash blocks train models); what every code block and inline code span
names is checked instead: repository paths (recipes/, eval/, bench/, posttrain/, docs/, tests/),
`make X` targets against the Makefile, `posttrain X` and `-m posttrain.cli X` subcommands and
`-m posttrain.launch` configs and stages against the CLI's tables, dotted `posttrain.x.y` names
against the package, and every relative link and its #anchor. Every `vllm serve` command in the
docs and the recipes names a `--host` other than all interfaces.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from posttrain.cli import COMMANDS
from posttrain.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BIN = Path(sys.executable).parent
PATH_ROOTS = ("recipes", "eval", "bench", "posttrain", "docs", "tests")
GENERATED = ("bench/out/",)  # written by a bench, not in the repository
ALL_INTERFACES = {"0.0.0.0", "::", "[::]", "", "''", '""'}
PLACEHOLDER = re.compile(r"[<…]|\.\.\.|^[A-Z_]+$|\|")  # <stage>, …, ..., STAGE, a|b


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    lines: tuple[str, ...]


def _blocks(doc: Path) -> list[Block]:
    """Fenced code blocks, indented ones (inside a list item) included, indentation removed."""
    out, lines = [], doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,})(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        body = tuple(line[len(indent):] if line.startswith(indent) else line.lstrip()
                     for line in lines[i + 1:j])
        out.append(Block(doc, i + 1, lang, body))
        i = j + 1
    return out


def _prose(doc: Path) -> str:
    """The document without its fenced blocks (inline code spans are read from this)."""
    text, kept, fence = doc.read_text(), [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(`{3,})", line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            kept.append(line)
    return "\n".join(kept)


def _joined(lines: list[str] | tuple[str, ...]) -> list[str]:
    """Shell lines with their `\\` continuations joined."""
    out, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    if cur:
        out.append(cur)
    return out


# --- console transcripts: run ---------------------------------------------------------------

@dataclass(frozen=True)
class Transcript:
    where: str
    command: str
    expected: tuple[str, ...]


def _transcripts() -> list[Transcript]:
    out = []
    for doc in DOCS:
        for block in _blocks(doc):
            if block.lang != "console":
                continue
            current: list | None = None
            for k, line in enumerate(block.lines):
                if line.startswith("$ "):
                    current = [f"{_rel(doc)}:{block.line + 1 + k}", line[2:], []]
                    out.append(current)
                else:
                    assert current is not None, f"{_rel(doc)}:{block.line}: output before a `$ ` line"
                    current[2].append(line.rstrip())
    return [Transcript(w, c, tuple(e)) for w, c, e in out]


TRANSCRIPTS = _transcripts()


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv[0] == "posttrain":
        argv[0] = str(BIN / "posttrain")
    elif argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    elif argv[0] == "make":
        make = shutil.which("make")
        if make is None:
            pytest.skip("make is not installed")
        argv[0] = make
    else:
        raise AssertionError(f"console blocks run posttrain, python or make, not {argv[0]!r}")
    return argv


def _run(t: Transcript, runs_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}  # under `make test`
    env.update(POSTTRAIN_RUNS_DIR=str(runs_dir), COLUMNS="100", NO_COLOR="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    start = time.perf_counter()
    proc = subprocess.run(_argv(t.command), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, time.perf_counter() - start


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Every transcript's command, one after another (under `make test` this module has one core
    of its own); most of their time is the CLI importing torch, transformers and TRL."""
    out = {}
    for t in TRANSCRIPTS:
        runs_dir = tmp_path_factory.mktemp("runs")
        out[t.where] = (*_run(t, runs_dir), runs_dir)
    return out


def _matches(expected: list[str], actual: list[str]) -> bool:
    """`expected` lines equal `actual` lines, each `...` line standing for any number of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(_matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and _matches(expected[1:], actual[1:])


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def test_the_docs_show_commands_to_run():
    assert any("--help" in t.command for t in TRANSCRIPTS)
    assert any(t.expected[:1] and t.expected[0].startswith("posttrain: error:")
               for t in TRANSCRIPTS)


@pytest.mark.parametrize("t", TRANSCRIPTS, ids=[t.where for t in TRANSCRIPTS])
def test_console_command_prints_what_the_docs_show(t: Transcript, ran):
    proc, seconds, runs_dir = ran[t.where]
    said = f"{t.where}: `{t.command}` ({seconds:.1f} s)"
    if t.expected and t.expected[0].startswith("posttrain: error:"):
        assert proc.returncode == 2, f"{said} exited {proc.returncode}\n{proc.stderr[-2000:]}"
        assert _lines(proc.stderr) == list(t.expected), f"{said}: stderr was\n{proc.stderr}"
        assert proc.stdout == "", f"{said}: printed on stdout\n{proc.stdout}"
    else:
        assert proc.returncode == 0, f"{said} exited {proc.returncode}\n{proc.stderr[-2000:]}"
        assert _matches(list(t.expected), _lines(proc.stdout)), (
            f"{said} printed\n{proc.stdout}\nbut the docs show\n" + "\n".join(t.expected))
    assert not any(runs_dir.iterdir()), f"{said} wrote into its runs dir"


# --- what the docs name: checked ------------------------------------------------------------

def _code_texts(doc: Path) -> list[str]:
    """Shell commands of the doc's code blocks (continuations joined, `$ ` dropped) and its inline
    code spans (whitespace collapsed: a span may wrap)."""
    out = []
    for block in _blocks(doc):
        if block.lang == "console":  # commands only: the rest is their output
            lines = [line[2:] for line in block.lines if line.startswith("$ ")]
        elif block.lang in ("bash", "sh", "shell", ""):
            lines = list(block.lines)
        else:
            continue
        for line in _joined(lines):
            out += re.split(r"&&|;|\|\||(?<![<>])&(?!&)", line.split(" #")[0])
    out += [re.sub(r"\s+", " ", span) for span in re.findall(r"`([^`]+)`", _prose(doc))]
    return [s.strip() for s in out if s.strip()]


def _tokens(command: str) -> list[str]:
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):  # VAR=value before a command
        tokens.pop(0)
    return tokens


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*)$", text, re.M))
    targets: set[str] = set()
    for head in re.findall(r"^([^\s#:=][^:=\n]*?)\s*:(?!=)", text, re.M):
        if head.startswith(".") or "/" in head:  # .PHONY; files such as $(VENV)/.installed-cpu
            continue
        head = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), head)
        targets.update(head.split())
    return targets


SUBCOMMANDS = set(STAGES) | set(COMMANDS)
ACCELERATE_CONFIGS = {p.stem for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")}


def _check_command(tokens: list[str], targets: set[str]) -> list[str]:
    """What a command names that does not exist."""
    bad = []
    if tokens[:1] == ["make"]:
        for tok in tokens[1:]:
            if "=" in tok:
                key, _, value = tok.partition("=")
                if key == "ACCELERATE" and not PLACEHOLDER.search(value) \
                        and value not in ACCELERATE_CONFIGS:
                    bad.append(f"no accelerate config {value!r} in recipes/accelerate/")
            elif not tok.startswith("-") and not PLACEHOLDER.search(tok) and tok not in targets:
                bad.append(f"no Makefile target {tok!r}")
    if tokens[:1] == ["posttrain"] and len(tokens) > 1:
        sub = tokens[1]
        if not sub.startswith("-") and not PLACEHOLDER.search(sub) and sub not in SUBCOMMANDS:
            bad.append(f"no posttrain subcommand {sub!r}")
    for i, tok in enumerate(tokens[:-1]):
        if tok != "-m":
            continue
        module, rest = tokens[i + 1], tokens[i + 2:]
        if module == "posttrain.cli" and rest and not PLACEHOLDER.search(rest[0]) \
                and rest[0] not in SUBCOMMANDS:
            bad.append(f"no posttrain subcommand {rest[0]!r}")
        if module == "posttrain.launch" and len(rest) >= 3 and not rest[0].startswith("-"):
            config, stage = rest[0], rest[2]
            if not PLACEHOLDER.search(config) and config not in ACCELERATE_CONFIGS \
                    and not (ROOT / config).is_file():
                bad.append(f"no accelerate config {config!r}")
            if not PLACEHOLDER.search(stage) and stage not in STAGES:
                bad.append(f"no stage {stage!r}")
    return bad


def _path_exists(ref: str) -> bool:
    if ref.startswith(GENERATED):
        return True
    if "*" in ref:
        return any(ROOT.glob(ref))
    return (ROOT / ref).exists()


def _dotted_exists(name: str) -> bool:
    """`posttrain.a.b.attr`: modules as far as they go, then the next name defined in the last."""
    parts, path = name.split("."), ROOT / "posttrain"
    i = 1
    while i < len(parts) and ((path / parts[i]).is_dir() or (path / f"{parts[i]}.py").is_file()):
        path = path / parts[i]
        i += 1
    if i == 1:
        return False
    if i == len(parts):
        return True
    source = (path / "__init__.py") if path.is_dir() else path.with_suffix(".py")
    return re.search(rf"\b{re.escape(parts[i])}\b", source.read_text()) is not None


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", _prose(doc), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[_rel(d) for d in DOCS])
def test_paths_the_doc_names_exist(doc: Path):
    text = doc.read_text()
    refs = set(re.findall(rf"(?<![\w./$-])((?:{'|'.join(PATH_ROOTS)})/[\w.*/-]*[\w*/])", text))
    missing = sorted(r for r in refs if not _path_exists(r))
    assert missing == [], f"{_rel(doc)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=[_rel(d) for d in DOCS])
def test_commands_the_doc_names_exist(doc: Path):
    targets = _makefile_targets()
    bad = [f"`{c}`: {b}" for c in _code_texts(doc) for b in _check_command(_tokens(c), targets)]
    assert bad == [], f"{_rel(doc)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=[_rel(d) for d in DOCS])
def test_package_names_the_doc_uses_exist(doc: Path):
    names = set(re.findall(r"(?<![\w/.-])posttrain(?:\.\w+)+", "\n".join(_code_texts(doc))))
    missing = sorted(n for n in names if not _dotted_exists(n))
    assert missing == [], f"{_rel(doc)} names what the package lacks: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=[_rel(d) for d in DOCS])
def test_links_and_anchors_resolve(doc: Path):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
        if re.match(r"^[a-z]+:", target):
            continue  # an outside address
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert bad == [], f"{_rel(doc)}:\n" + "\n".join(bad)


def test_every_doc_page_is_indexed():
    index = (ROOT / "docs" / "README.md").read_text()
    readme = (ROOT / "README.md").read_text()
    pages = [d for d in DOCS if d.parent == ROOT / "docs" and d.name != "README.md"]
    assert pages, "docs/ has no pages"
    assert [p.name for p in pages if f"({p.name})" not in index] == []
    assert [p.name for p in pages if f"(docs/{p.name})" not in readme] == []


def _vllm_servers(text: str) -> list[str]:
    """`vllm serve` / `trl vllm-serve` command lines (YAML comment marks dropped, continuations
    joined); a name in backticks is prose about the command, not a command."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    return [line for line in _joined(lines)
            if re.search(r"(?:\btrl vllm-serve|\bvllm serve)(?!`)\s", line)]


def test_vllm_servers_never_bind_all_interfaces():
    files = DOCS + sorted((ROOT / "recipes").rglob("*.yaml"))
    servers = [(f, cmd) for f in files for cmd in _vllm_servers(f.read_text())]
    assert servers, "no vllm serve command found: the pattern no longer matches the docs"
    for f, cmd in servers:
        m = re.search(r"--host[ =](\S+)", cmd)
        assert m and m.group(1) not in ALL_INTERFACES, \
            f"{_rel(f)}: `{cmd.strip()}` must bind --host 127.0.0.1 or a named interface"
