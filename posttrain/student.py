"""Students made from a teacher: fewer of its layers, in its architecture or another one.

    posttrain student --from MODEL --out DIR [--layers every_other|all|spread:N|0,2,4] [--arch llama|qwen2]
                      [--run NAME]

R1 distils one reasoning model into small dense students of two families (Qwen2.5 and Llama). In
small, from one Llama-family teacher (SmolLM2-135M): a genuine `LlamaForCausalLM` and a genuine
`Qwen2ForCausalLM`, each holding every other decoder layer of the teacher, with its embeddings,
final norm and head, so a student starts from the teacher's weights instead of at random.

A Llama decoder and a Qwen2 decoder compute the same function (RMSNorm, rotary q/k, grouped-query
attention, SwiGLU) once Qwen2's q/k/v biases are zero and its sliding window is off, so the Qwen2
student gets the teacher's weights as they are, zero biases, and Qwen2's config with the
teacher's sizes, rope, norm epsilon and embedding tying. With `--layers all` it is the teacher
itself in the other architecture (tests/test_student.py: the same greedy output).

MODEL is what `init_from:` takes: a model dir, a `.gguf` or `pkg:` file, a hub id, or a finished
stage of `--run`. DIR gets the weights, config, generation config, the teacher's tokenizer, and
`posttrain_student.json`: source, kept layers, architectures, parameters before and after.
A mistake (layer list, architecture, a missing model or a DIR in use) stops before anything is
written.
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from posttrain import atomic
from posttrain.errors import UserError

ARCHS = ("llama", "qwen2")
RECORD_FILE = "posttrain_student.json"
# A saved tokenizer: whichever of these the teacher's dir holds is copied as it is.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def layer_list(spec: str, n_layers: int | None = None) -> list[int] | None:
    """The teacher layers `spec` keeps: `every_other` (0, 2, 4, ...), `all`, `spread:N` (N layers
    evenly spaced from the first to the last: a size other than half, e.g. 14 of 30 to come
    under 0.6x the parameters where the embeddings weigh a fifth), or increasing layer numbers
    (`0,2,4`). Without `n_layers` only the spelling is checked (None for the named ones).
    UserError for a bad spec."""
    if spec in ("every_other", "all"):
        if n_layers is None:
            return None
        return list(range(0, n_layers, 2 if spec == "every_other" else 1))
    if spec.startswith("spread:"):
        count = spec.removeprefix("spread:")
        if not count.isdigit() or int(count) < 2:
            raise UserError(f"--layers {spec!r}: spread:N keeps N >= 2 layers, e.g. spread:14")
        if n_layers is None:
            return None
        if int(count) > n_layers:
            raise UserError(f"--layers {spec!r}: the teacher has {n_layers} layers")
        last, n = n_layers - 1, int(count)
        return sorted({round(i * last / (n - 1)) for i in range(n)})
    try:
        kept = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UserError(f"--layers {spec!r}: give every_other, all, spread:N, or increasing layer "
                        f"numbers such as 0,2,4") from None
    if kept != sorted(set(kept)) or kept[0] < 0:
        raise UserError(f"--layers {spec!r}: layer numbers must be increasing, from 0")
    if n_layers is not None and kept[-1] >= n_layers:
        raise UserError(f"--layers {spec!r}: the teacher has layers 0-{n_layers - 1}")
    return kept


def make_student(source: str, out: str | Path, layers: str = "every_other",
                 arch: str | None = None, run: str = "demo") -> dict[str, Any]:
    """Write the student of teacher `source` (a model reference, or a stage of `run`) to `out`
    and return its record (also saved as `out/posttrain_student.json`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.gguf_import import is_gguf_ref, locate, read_header
    from posttrain.manifest import Manifest
    from posttrain.models import count_params, resolve_model_ref
    from posttrain.plan import resolve_ref

    if arch is not None and arch not in ARCHS:
        raise UserError(f"--arch {arch!r}: students are made as {' or '.join(ARCHS)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out dir")
    layer_list(layers)
    manifest = Manifest(run)
    if is_gguf_ref(source) and manifest.stage(source) is None:
        # The layer count from the file's header: a bad list stops before the file converts.
        info = read_header(locate(source))
        layer_list(layers, info["metadata"].get(f"{info['architecture']}.block_count"))
    ref = resolve_ref(source, manifest)
    path = resolve_model_ref(ref["path"])  # UserError for a path that is not there
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config from {path!r}: "
                        f"{str(e).splitlines()[0]}") from None
    kept = layer_list(layers, config.num_hidden_layers)
    arch = arch or config.model_type
    student_config = _student_config(config, arch, kept)

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    weights, zeros = _student_weights(teacher.state_dict(), kept, config, arch)
    student = AutoModelForCausalLM.from_config(student_config, dtype=teacher.dtype)
    missing = student.state_dict().keys() - weights.keys()
    for key in sorted(missing):  # the biases the teacher has not: zero, the same function
        weights[key] = torch.zeros_like(student.state_dict()[key])
    student.load_state_dict(weights, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)

    record = {"source": source, "source_path": path, **_lineage(ref, run),
              "teacher_arch": config.model_type, "arch": arch, "layers": layers,
              "kept_layers": kept, "teacher_layers": config.num_hidden_layers,
              "params_before": count_params(teacher), "params_after": count_params(student),
              "zero_initialized": sorted({_LAYER_KEY.sub(r"\2", k) for k in missing}),
              "dtype": str(teacher.dtype).removeprefix("torch."),
              "zero_weights_dropped": zeros}
    tmp = atomic.fresh_dir(out)
    try:
        student.save_pretrained(tmp)
        _save_tokenizer(path, tmp)
        atomic.write_json(tmp / RECORD_FILE, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.replace_dir(tmp, out)
    print(f"[posttrain] student of {source}: {arch}, layers {_ranges(kept)} of "
          f"{config.num_hidden_layers}, {record['params_after'] / 1e6:.1f}M of "
          f"{record['params_before'] / 1e6:.1f}M parameters -> {out}", file=sys.stderr)
    return record


def _student_config(teacher, arch: str, kept: list[int]):
    """The student's config: the teacher's with `len(kept)` layers, in `arch`'s class."""
    from transformers import LlamaConfig, Qwen2Config

    source = teacher.model_type
    if source not in ARCHS:
        raise UserError(f"the teacher is a {source!r} model; students are made from "
                        f"{' or '.join(ARCHS)} teachers")
    if getattr(teacher, "mlp_bias", False):
        raise UserError("the teacher's MLP has biases, which neither student architecture has")
    head_dim = getattr(teacher, "head_dim", None) or teacher.hidden_size // teacher.num_attention_heads
    if arch == "qwen2" and head_dim * teacher.num_attention_heads != teacher.hidden_size:
        raise UserError(f"the teacher's heads are {head_dim} wide, not hidden_size / heads: "
                        f"Qwen2 cannot hold them")
    layer_types = getattr(teacher, "layer_types", None)
    if arch == source:
        config = copy.deepcopy(teacher)
        config.num_hidden_layers = len(kept)
        if layer_types is not None:
            config.layer_types = [layer_types[i] for i in kept]
        return config
    if source == "qwen2" and getattr(teacher, "use_sliding_window", False):
        raise UserError("the teacher uses a sliding attention window, which Llama has not")
    same = {key: getattr(teacher, key) for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
        "rms_norm_eps", "use_cache", "tie_word_embeddings", "rope_parameters",
        "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")}
    if arch == "qwen2":
        return Qwen2Config(**same, num_hidden_layers=len(kept), use_sliding_window=False,
                           sliding_window=None, max_window_layers=len(kept),
                           layer_types=["full_attention"] * len(kept), dtype=teacher.dtype)
    # From Qwen2: its q/k/v biases need Llama's attention biases (o_proj's then starts at zero).
    return LlamaConfig(**same, num_hidden_layers=len(kept), head_dim=head_dim,
                       attention_bias=True, mlp_bias=False, dtype=teacher.dtype)


def _student_weights(state: dict, kept: list[int], teacher, arch: str) -> tuple[dict, list[str]]:
    """The teacher's tensors under the student's names (kept layers renumbered 0, 1, ...), and
    the names of all-zero teacher tensors the student has no place for."""
    index = {layer: i for i, layer in enumerate(kept)}
    weights, dropped = {}, []
    for key, value in state.items():
        match = _LAYER_KEY.fullmatch(key)
        if match:
            if int(match[1]) not in index:
                continue
            key = f"model.layers.{index[int(match[1])]}.{match[2]}"
        if arch == "qwen2" and key.endswith("self_attn.o_proj.bias"):
            if value.any():  # a Llama with attention biases: Qwen2 has none on o_proj
                raise UserError("the teacher's attention output has biases, which Qwen2 has not")
            dropped.append(key)
            continue
        weights[key] = value
    return weights, dropped


def _save_tokenizer(teacher: str, dest: Path) -> None:
    """The teacher's tokenizer in `dest`: its files copied as they are from a local dir, so the
    student tokenizes exactly as the teacher does; saved by transformers for a hub id."""
    files = [Path(teacher) / name for name in TOKENIZER_FILES if (Path(teacher) / name).is_file()]
    if files:
        for file in files:
            shutil.copy2(file, dest / file.name)
        return
    from transformers import AutoTokenizer
    try:
        AutoTokenizer.from_pretrained(teacher).save_pretrained(dest)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the teacher's tokenizer from {teacher!r}: "
                        f"{str(e).splitlines()[0]}") from None


def _lineage(ref: dict[str, Any], run: str) -> dict[str, Any]:
    """Where the teacher came from, as the plan records a reference: its stage, its GGUF file."""
    out: dict[str, Any] = {}
    if "stage" in ref:
        out.update(run=run, stage=ref["stage"], stage_ended=ref.get("stage_ended"))
    if "gguf" in ref:
        out["gguf"] = {k: ref["gguf"][k] for k in ("file", "sha256", "tensor_types")}
    return out


def _ranges(layers: list[int]) -> str:
    """`0,2,...,28` for a long even run; the list itself otherwise."""
    steps = {b - a for a, b in zip(layers, layers[1:])}
    if len(layers) > 4 and len(steps) == 1:
        step = steps.pop()
        return f"{layers[0]}-{layers[-1]}" if step == 1 else \
            f"{layers[0]},{layers[1]},...,{layers[-1]}"
    return ",".join(map(str, layers))
