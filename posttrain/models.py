"""Load causal LMs and tokenizers (hub id or local dir), and build the tiny demo world locally.

The demo needs no hub: `train_tokenizer` trains a small byte-level BPE on the tasks' text (digits
kept as single tokens, tags as single tokens) and saves it as an ordinary HF tokenizer with a chat
template; `build_tiny_model` makes a randomly initialised DeepSeek-V3-style MoE (the demo's base
and teacher) or a dense Qwen2 / Llama student from transformers configs.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
TAG_TOKENS = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, TOOL_OPEN, TOOL_CLOSE]
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
EOS, PAD, BOS = "<|end|>", "<|pad|>", "<|begin|>"

# The assistant turn is wrapped in {% generation %} so TRL's `assistant_only_loss` can mask
# everything else; `reasoning_content` (transformers' field for the thinking part) becomes the
# <think> block so datasets may keep reasoning and answer apart. A tool call ends the assistant
# turn as `<tool_call>NAME\nARGS</tool_call>`: the `python` tool's code as it is (no JSON escaping
# for a tiny model to learn), any other arguments as JSON; the tool's result is a `<|tool|>` turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}"
    "{%- generation -%}"
    "{%- if message.get('reasoning_content') -%}"
    "{{- '<think>' + message['reasoning_content'] + '</think>' -}}"
    "{%- endif -%}"
    "{{- message['content'] or '' -}}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- set args = fn['arguments'] -%}"
    "{{- '<tool_call>' + fn['name'] + '\n' -}}"
    "{%- if args is string -%}{{- args -}}"
    "{%- elif (args | list) == ['code'] -%}{{- args['code'] -}}"
    "{%- else -%}{{- args | tojson -}}{%- endif -%}"
    "{{- '</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|end|>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
# How transformers (and TRL's tool loop) parse a tiny-world assistant turn back into a message:
# the text up to a tool call is `content`, each `<tool_call>NAME\nCODE</tool_call>` a call of
# NAME with `{"code": CODE}`.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "content": {"close_pattern": r"(?=<tool_call>)|<\|end\|>\s*|$", "content": "text"},
        "tool_calls": {
            "open_pattern": r"<tool_call>(?P<name>\w+)\n",
            "close": "</tool_call>",
            "repeats": True,
            "content": "text",
            "transform": {"type": "function",
                          "function": {"name": "{name}", "arguments": {"code": "{content}"}}},
        },
    },
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # DeepSeek-V3 in miniature: MLA attention, 1 shared + 8 routed experts, sigmoid routing, top-2.
    "deepseek_v3": dict(
        hidden_size=96, intermediate_size=192, moe_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
        kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=24, routed_scaling_factor=1.0, norm_topk_prob=True,
        max_position_embeddings=512, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "llama": dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 384):
    """Byte-level BPE trained on `texts`, saved with the chat template; returns the HF tokenizer.

    Byte-level so any text (unicode, other languages) round-trips; digits are split one per token
    so arithmetic stays digit-wise.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, EOS, BOS, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                 pad_token=PAD, additional_special_tokens=ROLE_TOKENS)
    # The tags are ordinary (non-special) added tokens: one id each, yet kept by
    # `decode(skip_special_tokens=True)` so rewards and checkers see them.
    hf.add_tokens(TAG_TOKENS)
    hf.chat_template = CHAT_TEMPLATE
    hf.response_template = RESPONSE_TEMPLATE
    hf.padding_side = "left"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    return hf


def build_tiny_model(arch: str, tokenizer, seed: int = 0, eos_token_id: int | list[int] | None = None,
                     **overrides: Any):
    """A randomly initialised tiny causal LM of `arch` (deepseek_v3, qwen2, llama).

    `eos_token_id`: every id generation stops on (default: the tokenizer's EOS).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_CONFIGS:
        raise UserError(f"unknown tiny arch {arch!r}; known: {', '.join(TINY_CONFIGS)}")
    params = {**TINY_CONFIGS[arch], **overrides}
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    # No pad token (Llama-3): pad with the tokenizer's EOS, as `load_tokenizer` does.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        config = AutoConfig.for_model(arch, vocab_size=len(tokenizer),
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                      pad_token_id=pad, **params)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad {arch} config ({str(e).splitlines()[0]})") from None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    return model


def init_model(arch: str, tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0,
               **overrides: Any) -> Path:
    """A tiny random-weight model of `arch` around a real tokenizer, saved as an HF model dir.

    The vocabulary, special tokens, chat template and stop ids are the tokenizer's (its
    `generation_config.json`, when the folder has one, gives every id generation stops on), so a
    full-size recipe can be smoke-tested on CPU along the path a hub model takes.
    """
    from transformers import AutoTokenizer, GenerationConfig

    src = Path(_check_ref(tokenizer_dir))  # a GGUF file: its converted dir
    if not src.is_dir():
        raise UserError(f"tokenizer dir {src} not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {src}: {str(e).splitlines()[0]}") from None
    eos = None
    if (src / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(str(src)).eos_token_id
    model = build_tiny_model(arch, tokenizer, seed=seed, eos_token_id=eos, **overrides)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def device():
    """The one device policy: every model we load goes to the GPU when there is one, else CPU."""
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """Every id generation stops on: the model's `generation_config` EOS ids (Llama-3 stops on
    three) and the tokenizer's EOS, in that order, without repeats."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def saved_generation_config(model_dir: str | Path):
    """A model dir's `GenerationConfig` (None when it has none), read without loading weights."""
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        return None


def resolve_model_ref(ref: str | Path) -> str:
    """A model reference as what loading takes: a local dir (a GGUF file's converted dir) or a
    hub id; UserError for neither."""
    return _check_ref(ref)


def _check_ref(ref: str | Path) -> str:
    """`ref` as a local dir or hub id: a GGUF file becomes its converted HF dir
    (posttrain.gguf_import); UserError for something that is neither a local path nor a hub id."""
    from posttrain.gguf_import import imported_dir, is_gguf_ref

    if is_gguf_ref(ref):
        return str(imported_dir(ref)[0])
    path = Path(str(ref)).expanduser()
    if path.exists():
        return str(path)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(ref)):
        raise UserError(f"model {str(ref)!r} not found: give a model dir, a .gguf file, a hub id, "
                        f"or a stage name")
    return str(ref)


_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_tokenizer_class(ref: str) -> str | None:
    config = Path(ref) / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


_NOTICED: set[str] = set()


def load_tokenizer(ref: str | Path, chat_template: str | None = None,
                   answer_format: str = "tags"):
    """Tokenizer of a model dir, GGUF file or hub id, left-padded for generation, with a pad
    token and a chat template.

    The template: `chat_template` when given (a name in `posttrain.templates.NAMED`, e.g.
    `r1_zero`, or Jinja), else the tokenizer's own, else — a base checkpoint — R1-Zero's prompt in
    `answer_format` (posttrain.templates), with a one-line notice.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from posttrain import templates

    ref = _check_ref(ref)
    try:
        # A generic saved tokenizer (ours) loads as itself: AutoTokenizer would pick the class
        # of the model type (Qwen2Tokenizer for a qwen2 student), which adds tokens of its own.
        cls = PreTrainedTokenizerFast if _saved_tokenizer_class(ref) in _GENERIC_TOKENIZERS \
            else AutoTokenizer
        tok = cls.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {ref!r}: {str(e).splitlines()[0]}") from None
    if chat_template:
        tok.chat_template = templates.named_or_jinja(chat_template, answer_format)
    elif not tok.chat_template:
        tok.chat_template = templates.r1_zero(answer_format)
        if ref not in _NOTICED:
            _NOTICED.add(ref)
            print(f"[posttrain] {ref} has no chat template (a base checkpoint): prompting it with "
                  f"R1-Zero's template (chat_template: r1_zero); set chat_template to choose "
                  f"another", file=sys.stderr)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


# Tokenizers handed to readers, by (ref, options, the files of a local dir): see shared_tokenizer.
_SHARED: dict[tuple, Any] = {}
_SHARED_MAX = 4


def shared_tokenizer(ref: str | Path, chat_template: str | None = None,
                     answer_format: str = "tags"):
    """`load_tokenizer`'s tokenizer, loaded once per process for callers that only read it
    (checks, rendering prompts, decoding); a trainer, which may change it, loads its own.

    A 128k-152k-token vocabulary takes 1.5 s to load (and as long to copy), and a stage reads its
    model's tokenizer three or four times (preflight, prompts, generation, eval). A local dir is
    keyed by its files' sizes and times, so a stage that rewrites the dir gets the new one.
    """
    key = (str(ref), chat_template, answer_format, _dir_signature(ref))
    if key not in _SHARED:
        while len(_SHARED) >= _SHARED_MAX:
            _SHARED.pop(next(iter(_SHARED)))
        _SHARED[key] = load_tokenizer(ref, chat_template, answer_format)
    return _SHARED[key]


def _dir_signature(ref: str | Path) -> tuple:
    path = Path(ref).expanduser()
    if not path.is_dir():
        return ()
    stats = ((f.name, f.stat()) for f in path.iterdir() if f.is_file())
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


def load_model(ref: str | Path, dtype: str = "auto"):
    """Causal LM from a model dir or hub id, on `device()` (bf16 on a GPU, fp32 on CPU, unless
    `dtype` says otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = _check_ref(ref)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model from {ref!r}: {str(e).splitlines()[0]}") from None
    return model.to(device())


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
