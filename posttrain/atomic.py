"""Writes a reader never sees half of: a file or a whole directory, swapped in by rename.

A crash (kill -9, a full disk, a lost node) in the middle of a write must leave the old version
or the new one, never a mix: manifests, plans, logs trimmed on resume, datasets and model dirs
are all written to a temporary sibling first and renamed into place (`os.replace` is atomic on
one filesystem).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fresh_dir(dest: Path) -> Path:
    """An empty `<dest>.tmp` dir beside `dest`, to fill and then `replace_dir` into place."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, dest: Path) -> Path:
    """Swap the filled dir `tmp` in as `dest`: the old `dest` moves aside, `tmp` takes its name,
    the old one is deleted. A crash in between leaves `dest` whole (old or new) or `<dest>.old`."""
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
