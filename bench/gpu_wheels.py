"""The wheels `bench/gpu_check.py` needs on an offline GPU image, in one folder, and the command
that installs them there.

The GPU machines lent to this project have no network and their own image (Python 3.12, torch
with CUDA, triton, transformers, accelerate, peft, safetensors, tokenizers, numpy, pyarrow,
pandas, python-dateutil, xxhash, pytest); a call may
carry at most 64 MiB with the working tree. Run this where the package index is reachable: it
downloads exactly the packages the check imports beyond such an image (TRL, datasets and what
datasets needs beyond the image, math-verify), at the versions installed here, as cp312 manylinux x86_64 wheels
(pure-python where they exist), into a git-ignored folder; checks the folder fits; and prints
the one line that installs them there and runs the check from the source tree. vLLM does not fit
(~400 MB): the check reports its vLLM checks skipped. matplotlib is left out too (plots are
skipped, said once).

Run: `python bench/gpu_wheels.py [--out bench/out/gpu_wheels] [--python 3.12]`. Last line:
`{"folder", "wheels", "mib", "command"}`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MIB = 64
# What bench/gpu_check.py imports that such an image lacks (its NEEDS, closed over their
# requirements, minus the image's own packages).
# The image has pyarrow, pandas, python-dateutil and xxhash: they are not carried.
PACKAGES = ("trl", "datasets", "dill", "multiprocess", "math-verify", "latex2sympy2_extended",
            "antlr4-python3-runtime")
# Where the wheels are installed on the image: a path with `site-packages` in it, because dill
# (under datasets' fingerprinting) pickles by value every module whose file is not under such a
# path, and fails on pyarrow's types.
TARGET = ".gpu_deps/lib/site-packages"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def pinned() -> list[str]:
    """Each package at the version installed here (the versions the test-suite ran)."""
    return [f"{name}=={metadata.version(name)}" for name in PACKAGES]


def download(folder: Path, python: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    abi = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "none",
           "--abi", "abi3", *(x for p in PLATFORMS for x in ("--platform", p)),
           "--dest", str(folder), "--quiet", *pinned()]
    subprocess.run(cmd, check=True)
    return sorted(folder.glob("*.whl"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu_wheels"))
    ap.add_argument("--python", default="3.12", help="the image's Python (the wheels' ABI)")
    args = ap.parse_args()
    folder = Path(args.out)
    wheels = download(folder, args.python)
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{'wheel':<64}{'MiB':>8}")
    for w in wheels:
        print(f"{w.name:<64}{w.stat().st_size / 2**20:>8.2f}")
    print(f"{len(wheels)} wheels, {mib:.1f} MiB (limit {LIMIT_MIB})")
    if mib > LIMIT_MIB:
        print(f"too large for one call: {mib:.1f} MiB > {LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    rel = folder.resolve().relative_to(ROOT) if folder.resolve().is_relative_to(ROOT) else folder
    command = ("python3 -m pip install --no-index --no-deps "
               f"--target {TARGET} {rel}/*.whl && PYTHONPATH={TARGET}:. python3 "
               f"bench/gpu_check.py --out $OUT/gpu_check.json")
    print(f"on the GPU image, from the repository root:\n  {command}")
    print(json.dumps({"folder": str(folder), "wheels": len(wheels), "mib": round(mib, 1),
                      "command": command}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
