"""Every GGUF tensor type the `gguf` package reads imports to the weights gguf itself
dequantizes: files written here from SmolLM2-135M-Instruct's real tensors (the bundled GGUF, cut
to a few layers and its first 1024 tokens) with gguf's GGUFWriter, each tensor stored in a type
of the test's choosing, go through the real import (`imported_dir` / `posttrain import`) and come
out equal, value for value, to `gguf.quants.dequantize` of what was written, in transformers'
layout (q/k rows un-permuted).

gguf can write only some types (`gguf.quants.quantize`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16, TQ1_0,
TQ2_0, MXFP4, and F16/F32); those store SmolLM2's values. The types it can only read (the K-quants,
the IQ types, NVFP4) store random blocks, any block that decodes to a non-finite number zeroed:
what is checked for them is that the import unpacks them exactly as gguf does.

The cut keeps the tests cheap (a whole SmolLM2 takes half a minute of CPU to import, most of it
in parsing its 49k-token vocabulary and mapping its 30 layers' names): the vocabulary is cut to
its first tokens (with the merges among them) and the embedding to match; the all-types file
also cuts the widths (the first 4 of 9 query heads, 2 of 3 key/value heads, 512 of 1536 MLP
channels), so that every matrix has rows of 256 or 512 values and takes any block type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from posttrain.cli import main as cli_main
from posttrain.gguf_import import readable_types, smollm2_gguf, type_name

pytestmark = pytest.mark.slow

HEAD_DIM, VOCAB = 64, 1024  # SmolLM2's head width; the tokens the cut keeps
_HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@dataclass(frozen=True)
class Cut:
    """The sizes of a file cut from SmolLM2: its first `layers` layers and VOCAB tokens, at its
    own widths unless narrowed (the first heads, the first MLP channels)."""
    layers: int
    heads: int = 9
    kv_heads: int = 3
    ffn: int = 1536

    @property
    def hidden(self) -> int:
        return self.heads * HEAD_DIM

    def sizes(self) -> dict[int, int]:
        """SmolLM2's size of a tensor dimension -> the cut's: the first rows/columns are kept."""
        return {576: self.hidden, 192: self.kv_heads * HEAD_DIM, 1536: self.ffn, 49152: VOCAB}

    def metadata(self) -> dict[str, int]:
        return {"llama.block_count": self.layers, "llama.embedding_length": self.hidden,
                "llama.feed_forward_length": self.ffn, "llama.attention.head_count": self.heads,
                "llama.attention.head_count_kv": self.kv_heads, "llama.vocab_size": VOCAB}


NARROW = Cut(layers=4, heads=4, kv_heads=2, ffn=512)  # 28 matrices, every row 256 or 512 values


@pytest.fixture(scope="module")
def source():
    """The bundled SmolLM2 GGUF, read once by gguf: `(fields, tensors)`, the tokenizer's fields
    already cut to the first VOCAB tokens and the merges among them."""
    import gguf
    reader = gguf.GGUFReader(str(smollm2_gguf()))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents(slice(0, VOCAB))
    kept, merges = set(tokens), []
    # A merge must name tokens of the vocabulary. Merges come in the order of the tokens they
    # make, so those that make a kept token lie among the first VOCAB.
    for merge in reader.fields["tokenizer.ggml.merges"].contents(slice(0, VOCAB)):
        left, right = merge.split(" ")
        if {left, right, left + right} <= kept:
            merges.append(merge)
    assert len(merges) > 500
    cut = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
           "tokenizer.ggml.token_type":
               reader.fields["tokenizer.ggml.token_type"].contents(slice(0, VOCAB))}
    fields = []
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        fields.append((field.name, cut[field.name] if field.name in cut else field.contents(),
                       kind, field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None))
    return fields, [(t.name, t.tensor_type, t.data) for t in reader.tensors]


def hf_name(gguf_name: str) -> str:
    """transformers' name of a llama GGUF tensor."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, part, leaf = gguf_name.split(".")
    return f"model.layers.{layer}.{_HF_NAMES[part]}.{leaf}"


def hf_rows(gguf_name: str, values: np.ndarray, cut: Cut) -> np.ndarray:
    """A tensor as transformers holds it: llama.cpp's converter permutes the rows of q and k
    (`LlamaModel.permute` in convert_hf_to_gguf.py, copied below); undo it by the inverse of the
    permutation it applies to the row indices."""
    heads = (cut.heads if ".attn_q." in gguf_name else
             cut.kv_heads if ".attn_k." in gguf_name else None)
    if heads is None:
        return values
    rows = np.arange(values.shape[0])
    permuted = (rows.reshape(heads, 2, rows.shape[0] // heads // 2)
                .swapaxes(1, 2).reshape(rows.shape))
    return values[np.argsort(permuted)]


def store(values: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """`values` in `qtype` as gguf writes it, or random blocks of `qtype` where gguf cannot
    quantize to it (zeroed where they would decode to a non-finite number)."""
    from gguf import GGML_QUANT_SIZES, quants
    try:
        return quants.quantize(values, qtype)
    except NotImplementedError:
        pass
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = values.shape
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # a random fp16 scale may be inf or NaN
        decoded = quants.dequantize(data.reshape(rows, -1), qtype)
    decoded = decoded.reshape(rows, cols // block, block)
    data[~np.isfinite(decoded).all(-1)] = 0
    return data.reshape(rows, -1)


def write_gguf(dest: Path, source, cut: Cut, choose) -> dict[str, tuple[str, np.ndarray]]:
    """A GGUF of SmolLM2 cut to `cut` (its metadata, the sizes changed to match) in which each
    2-D layer tensor is stored as `choose(name, row_length)` says; the embedding and the norms
    keep the bundled file's types. Returns `{gguf name: (type, gguf's dequantization)}`."""
    import gguf
    from gguf import quants

    fields, tensors = source
    sizes, metadata = cut.sizes(), cut.metadata()
    writer = gguf.GGUFWriter(dest, "llama")
    for name, value, kind, sub_type in fields:
        writer.add_key_value(name, metadata.get(name, value), kind, sub_type=sub_type)
    rng = np.random.default_rng(0)
    expected = {}
    for name, qtype, data in tensors:
        if name.startswith("blk.") and int(name.split(".")[1]) >= cut.layers:
            continue
        # The rows are cut before unpacking (the embedding has 49152), the columns after.
        data = data[:sizes[data.shape[0]]]
        values = quants.dequantize(data, qtype)
        if values.ndim == 2:
            values = values[:, :sizes[values.shape[1]]]
        if name.startswith("blk.") and values.ndim == 2:
            qtype = choose(name, values.shape[1])
        data = store(values, qtype, rng)
        writer.add_tensor(name, data, raw_dtype=qtype)
        expected[name] = (qtype.name, quants.dequantize(data, qtype).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def assert_imported(model_dir: Path, expected: dict[str, tuple[str, np.ndarray]],
                    cut: Cut) -> None:
    """Every tensor of the imported dir equals gguf's dequantization of the file's, in
    transformers' layout, and the record lists the file's types."""
    from safetensors.numpy import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    assert set(weights) == {hf_name(n) for n in expected}  # tied: no lm_head of its own
    for name, (qtype, values) in expected.items():
        got = weights[hf_name(name)]
        assert got.dtype == np.float32 and got.shape == values.shape, name
        assert np.array_equal(got, hf_rows(name, values, cut)), f"{name} ({qtype})"
    record = json.loads((model_dir / "posttrain_import.json").read_text())
    types = sorted({qtype for qtype, _ in expected.values()})
    assert record["tensor_types"] == types and record["dtype"] == "float32"
    assert sum(record["tensor_type_counts"].values()) == len(expected)
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (cut.layers, cut.heads,
                                                                     cut.kv_heads, VOCAB)


def test_every_type_gguf_reads(source, runs_root, tmp_path):
    """One file holding every type gguf reads, in turn on the 28 matrices of four narrowed
    layers (rows of 256 or 512 values, which blocks of 1, 32, 64 and 256 all divide)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from posttrain.gguf_import import imported_dir

    readable = [GGMLQuantizationType(t) for t in readable_types()]
    assert all(256 % GGML_QUANT_SIZES[t][0] == 0 for t in readable)  # each has a place
    turn = iter(range(10_000))

    def choose(name: str, row: int):
        return readable[next(turn) % len(readable)]

    path = tmp_path / "every-type.gguf"
    expected = write_gguf(path, source, NARROW, choose)
    assert {qtype for qtype, _ in expected.values()} == {t.name for t in readable}
    model_dir, record = imported_dir(path)
    assert_imported(model_dir, expected, NARROW)
    # This transformers reads llama with its older loader: gguf dequantizes every type.
    assert record["unpacked_by"] == {t.name: "gguf" for t in readable
                                     if t.name not in ("F32", "F16", "BF16")}


def q4_k_m(name: str, row: int):
    """llama.cpp's Q4_K_M choice for a SmolLM2 tensor, simplified: Q6_K for attn_v and ffn_down
    of every other layer, Q4_K elsewhere; a row of 576 (not a whole number of 256-value blocks)
    falls back to Q8_0 for Q6_K and Q5_0 for Q4_K, as llama.cpp does."""
    from gguf import GGMLQuantizationType as Q

    more_bits = name.split(".")[2] in ("attn_v", "ffn_down") and int(name.split(".")[1]) % 2 == 0
    if row % 256:
        return Q.Q8_0 if more_bits else Q.Q5_0
    return Q.Q6_K if more_bits else Q.Q4_K


def test_q4_k_m_mix_through_the_cli(source, runs_root, tmp_path, capsys):
    """The file that stopped the import before (`ggml type 6`): Q4_K, Q6_K, Q8_0 and Q5_0
    tensors beside the F32 norms, at SmolLM2's own widths, through `posttrain import`."""
    cut = Cut(layers=2)
    path = tmp_path / "smol-q4_k_m.gguf"
    expected = write_gguf(path, source, cut, q4_k_m)
    assert {qtype for qtype, _ in expected.values()} == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    out = tmp_path / "smol"
    assert cli_main(["import", str(path), "--out", str(out)]) == 0
    assert_imported(out, expected, cut)
    assert "Q5_0" in capsys.readouterr().err  # the import says what it reads
    # A fresh dir is a real model: it loads and runs.
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_types_transformers_kernels_lack_are_dequantized_by_gguf(source, runs_root, tmp_path,
                                                                   monkeypatch, capsys):
    """For the architectures of transformers' newer GGUF reader (torch kernels for a fixed list
    of block types), a type it lacks goes through a temporary copy holding gguf's F32 values.
    Forced here on a llama file (the bundled checkpoint's architecture): the weights still equal
    gguf's dequantization, the record says who unpacked what, and the copy is gone."""
    from gguf import GGMLQuantizationType as Q

    from posttrain import gguf_import

    kernels = {int(Q.Q4_0), int(Q.Q8_0)}
    monkeypatch.setattr(gguf_import, "transformers_unpacks", lambda arch: kernels)
    types = iter([Q.Q5_0, Q.Q5_1, Q.Q4_0] * 20)
    cut = Cut(layers=1, heads=4, kv_heads=2, ffn=512)
    path = tmp_path / "kernels-lack.gguf"
    expected = write_gguf(path, source, cut, lambda name, row: next(types))
    model_dir, record = gguf_import.imported_dir(path)
    assert_imported(model_dir, expected, cut)
    assert record["unpacked_by"] == {"Q4_0": "transformers", "Q5_0": "gguf", "Q5_1": "gguf",
                                     "Q8_0": "transformers"}
    assert "no kernel for Q5_0, Q5_1" in capsys.readouterr().err
    assert not list(model_dir.parent.rglob("*.values.gguf"))


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _gguf_with(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    import gguf
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: _text(p, "not a checkpoint\n"), "is not a GGUF file"),
    (lambda p: _gguf_with(p, "no-such-arch", {"w": np.zeros((2, 32), np.float32)}),
     "architecture 'no-such-arch' cannot be read from GGUF by transformers"),
    (lambda p: _gguf_with(p, "llama", {"w": np.zeros((2, 32), np.int32)}),
     "tensor type(s) I32 cannot be dequantized by the gguf package"),
], ids=["not gguf", "unknown architecture", "type gguf cannot read"])
def test_bad_files_are_one_line_errors(make, message, tmp_path, capsys):
    path = make(tmp_path / "model.gguf")
    out = tmp_path / "out"
    assert cli_main(["import", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_type_names_and_tables():
    assert type_name(6) == "Q5_0" and type_name(14) == "Q6_K" and type_name(999) == "type 999"
    names = {type_name(t) for t in readable_types()}
    assert {"Q5_0", "Q5_1", "Q4_K", "Q6_K", "Q8_0", "BF16", "IQ2_XXS", "MXFP4"} <= names
    assert "I32" not in names and "Q8_K" not in names
