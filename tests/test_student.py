"""`posttrain student`: one Llama-family teacher (the bundled SmolLM2-135M-Instruct) yields a
genuine Llama and a genuine Qwen2 student, each with every other layer of the teacher and its
tokenizer. The Qwen2 copy of the whole teacher generates what the teacher generates; a pruned
student holds exactly the teacher's weights for the layers it keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import main as cli_main
from posttrain.errors import UserError
from posttrain.gguf_import import SMOLLM2

pytestmark = pytest.mark.slow

PROMPTS = ["What is 12 + 29?", "Name a colour of the sky."]
LAYER = 3_540_096  # one SmolLM2 decoder layer: q,o 576x576; k,v 192x576; MLP 3x576x1536; 2 norms
QWEN2_BIASES = 576 + 192 + 192  # q, k, v


@pytest.fixture(scope="module")
def teacher_dir(runs_root) -> Path:
    """The bundled GGUF as an HF dir, imported once for the session (the import, half a minute
    of CPU, is cached by the file's hash where every worker sees it: `--from SMOLLM2` below
    finds it)."""
    from posttrain.gguf_import import imported_dir
    return imported_dir(SMOLLM2)[0]


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    """The imported teacher, loaded once."""
    from transformers import AutoModelForCausalLM
    return teacher_dir, AutoModelForCausalLM.from_pretrained(teacher_dir).eval()


@pytest.fixture(scope="module")
def students(teacher_dir, tmp_path_factory):
    """Every-other-layer students of the teacher in both architectures, made by the CLI from the
    GGUF reference itself."""
    root = tmp_path_factory.mktemp("students")
    out = {}
    for arch in ("llama", "qwen2"):
        out[arch] = root / arch
        assert cli_main(["student", "--from", SMOLLM2, "--out", str(out[arch]),
                         "--arch", arch]) == 0
    return out


def greedy(model, tokenizer, new_tokens: int = 8):
    """The greedy continuations of PROMPTS (one left-padded batch) and the logits of each step."""
    import torch
    batch = tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in PROMPTS],
                                          add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True, padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, batch["input_ids"].shape[1]:].tolist(), torch.stack(out.logits)


def test_qwen2_copy_of_the_whole_teacher_generates_the_same(teacher, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    from posttrain.models import load_tokenizer
    from posttrain.student import make_student

    path, model = teacher
    record = make_student(str(path), tmp_path / "qwen2", layers="all", arch="qwen2")
    copy = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2").eval()
    assert type(copy) is Qwen2ForCausalLM and not copy.config.use_sliding_window
    assert record["params_after"] == record["params_before"] + 30 * QWEN2_BIASES
    expected, expected_logits = greedy(model, load_tokenizer(path))
    assert all(len(set(seq)) > 3 for seq in expected)  # real text, not one token repeated
    tokens, logits = greedy(copy, load_tokenizer(tmp_path / "qwen2"))
    assert tokens == expected
    # The same function, not only the same argmax: every step's logits (before the min-length
    # processor) agree.
    assert (logits - expected_logits).abs().max().item() < 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_other_layer_student(arch, teacher, students):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from posttrain.models import load_tokenizer

    path, model = teacher
    out = students[arch]
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(student).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 15
    record = json.loads((out / "posttrain_student.json").read_text())
    assert record["kept_layers"] == list(range(0, 30, 2)) and record["arch"] == arch
    assert record["source"] == SMOLLM2 and record["gguf"]["tensor_types"] == ["F32", "Q4_1", "Q8_0"]
    # The embedding (tied to the head) and 15 of 30 layers: about 60% of the teacher, since the
    # 28M-parameter embedding stays whole.
    after = record["params_before"] - 15 * LAYER + (15 * QWEN2_BIASES if arch == "qwen2" else 0)
    assert record["params_after"] == after == sum(p.numel() for p in student.parameters())
    assert 0.55 < after / record["params_before"] < 0.65
    # The kept layers are the teacher's, renumbered; biases Qwen2 adds are zero.
    teacher_weights, student_weights = model.state_dict(), student.state_dict()
    for name, value in student_weights.items():
        if name.startswith("model.layers."):
            _, _, j, rest = name.split(".", 3)
            source = f"model.layers.{2 * int(j)}.{rest}"
            if rest.endswith("_proj.bias"):
                assert arch == "qwen2" and not value.any()
                continue
        else:
            source = name
        assert torch.equal(value, teacher_weights[source]), name
    assert student.config.tie_word_embeddings
    assert GenerationConfig.from_pretrained(out).eos_token_id == [2]
    # The teacher's tokenizer, template and stop token.
    ours, theirs = load_tokenizer(out), load_tokenizer(path)
    text = "<|im_start|>user\nWhat is 7 + 8?<|im_end|>"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.chat_template == theirs.chat_template and ours.eos_token_id == 2


def test_a_stage_as_teacher_and_a_listed_layer_set(students, runs_root, tmp_path):
    """`--from STAGE --run NAME` resolves through the manifest (here a run whose `grpo` is the
    Qwen2 student); Qwen2 back to Llama keeps the function (q/k/v biases carried, o_proj's zero)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from posttrain import atomic
    from posttrain.manifest import Manifest

    manifest = Manifest("studentrun")
    atomic.write_json(manifest.path, {"run": "studentrun", "stages": {"grpo": {
        "kind": "grpo", "status": "done", "output_dir": str(students["qwen2"]),
        "ended": "2025-01-01T00:00:00+00:00"}}})
    out = tmp_path / "llama"
    assert cli_main(["student", "--from", "grpo", "--run", "studentrun", "--out", str(out),
                     "--layers", "0,1,14", "--arch", "llama"]) == 0
    record = json.loads((out / "posttrain_student.json").read_text())
    assert (record["stage"], record["run"], record["kept_layers"]) == ("grpo", "studentrun",
                                                                       [0, 1, 14])
    assert record["teacher_arch"] == "qwen2" and record["zero_initialized"] == ["self_attn.o_proj.bias"]
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(student) is LlamaForCausalLM and student.config.num_hidden_layers == 3
    qwen = AutoModelForCausalLM.from_pretrained(students["qwen2"]).eval()
    for j, i in enumerate([0, 1, 14]):
        assert torch.equal(student.model.layers[j].mlp.down_proj.weight,
                           qwen.model.layers[i].mlp.down_proj.weight)
    # Qwen2 with only those three layers computes what the Llama student does.
    qwen.model.layers = torch.nn.ModuleList([qwen.model.layers[i] for i in (0, 1, 14)])
    qwen.config.num_hidden_layers = 3
    qwen.config.layer_types = qwen.config.layer_types[:3]
    for j, layer in enumerate(qwen.model.layers):
        layer.self_attn.layer_idx = j
    ids = torch.tensor([[1, 42, 1337, 7]])
    with torch.no_grad():
        gap = student(ids, use_cache=False).logits - qwen(ids, use_cache=False).logits
    assert gap.abs().max().item() < 1e-4


def test_spread_keeps_the_first_and_last_layers_evenly_spaced():
    from posttrain.student import layer_list
    assert layer_list("spread:14", 30) == [0, 2, 4, 7, 9, 11, 13, 16, 18, 20, 22, 25, 27, 29]
    assert layer_list("spread:2", 5) == [0, 4] and layer_list("spread:5", 5) == [0, 1, 2, 3, 4]
    assert layer_list("spread:14") is None  # spelling only, before the teacher is read
    with pytest.raises(UserError, match="the teacher has 5 layers"):
        layer_list("spread:6", 5)


@pytest.mark.parametrize("args, message", [
    (["--layers", "0,x"], "--layers '0,x': give every_other, all, spread:N, or increasing layer numbers"),
    (["--layers", "4,2"], "--layers '4,2': layer numbers must be increasing, from 0"),
    (["--layers", "0,30"], "--layers '0,30': the teacher has layers 0-29"),
    (["--layers", "spread:1"], "--layers 'spread:1': spread:N keeps N >= 2 layers, e.g. spread:14"),
    (["--arch", "mistral"], "--arch 'mistral': students are made as llama or qwen2"),
    (["--from", "{tmp}/no-such-model"], "model '{tmp}/no-such-model' not found"),
    (["--from", "sft"], "stage 'sft' has not run in run 'demo'"),
    (["--from", "{tmp}/missing.gguf"], "GGUF file {tmp}/missing.gguf not found"),
    (["--out", "{tmp}/full"], "{tmp}/full exists and is not empty; choose a new --out dir"),
    (["--layers"], "argument --layers: expected one argument"),
], ids=["layer not a number", "layers out of order", "layer out of range", "spread of one",
         "unknown arch",
        "missing dir", "missing stage", "missing gguf", "out in use", "no layer list"])
def test_mistakes_are_one_line_and_write_nothing(args, message, teacher_dir, runs_root, tmp_path,
                                                 monkeypatch, capsys):
    """Each mistake is found before any weights are read: loading a model here fails the test."""
    from transformers import AutoModelForCausalLM

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine\n")
    argv = {"--from": str(teacher_dir), "--out": str(tmp_path / "student")}
    extra = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for flag in ("--from", "--out"):
        if flag in extra:
            argv[flag] = extra.pop(extra.index(flag) + 1)
            extra.remove(flag)
    before = sorted(Path(runs_root).rglob("*"))
    assert cli_main(["student", *[x for kv in argv.items() for x in kv], *extra]) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and err.count("\n") == 1, err
    assert not (tmp_path / "student").exists() and not (tmp_path / "student.tmp").exists()
    assert sorted(Path(runs_root).rglob("*")) == before
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
