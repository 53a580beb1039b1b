"""How a distilled student learns from its teacher: the `method:` of a distill recipe.

- `traces`: SFT on the teacher's verified samples (TRL `SFTTrainer`), R1's distillation.
- `logits`: the student matches the teacher's next-token distribution at every token of those same
  traces (TRL's GKD trainer with `lmbda` 0, so the student never generates); `beta` 0 is forward
  KL, 0.5 the Jensen-Shannon divergence, 1 reverse KL.
- `on_policy`: the student samples the prompts and the teacher scores each of the student's tokens
  (TRL `DistillationTrainer`, reverse KL by default). With `lmbda` < 1, each step is on-policy with
  probability `lmbda` and otherwise a batch of the teacher's traces (GKD's mixing, TRL's GKD
  trainer), so the teacher samples traces first.

The two logit methods compare the teacher's and the student's full distributions, so both must
tokenize alike: `check_shared_vocabulary` says so in one line before the stage starts. The
temperature is a subclass hook, since TRL's GKD trainer passes none to its divergence.
"""

from __future__ import annotations

import os
import sys
from typing import Any

# The GKD trainer lives under trl.experimental (pinned TRL): its import warning on every distill
# recipe would only repeat what this docstring says.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from posttrain.errors import UserError

METHODS = ("traces", "logits", "on_policy")
SFT, GKD, ON_POLICY = "trl.SFTConfig", "trl.experimental.gkd.GKDConfig", "trl.DistillationConfig"
# Each method's `beta` when the recipe sets none: forward KL on the teacher's traces (classic
# knowledge distillation), reverse KL on the student's own samples (mode-seeking, as on-policy
# distillation is usually run).
DEFAULT_BETA = {"logits": 0.0, "on_policy": 1.0}


def config_path(method: str, lmbda: float) -> str:
    """The TRL config class a method trains with."""
    if method == "traces":
        return SFT
    return ON_POLICY if method == "on_policy" and lmbda == 1.0 else GKD


def samples_teacher(method: str, lmbda: float) -> bool:
    """Whether the method trains on the teacher's sampled traces (all but pure on-policy)."""
    return method != "on_policy" or lmbda < 1.0


def method_settings(method: str, *, beta: float | None, lmbda: float, temperature: float,
                    max_new_tokens: int) -> dict[str, Any]:
    """The TRL keys a method sets: divergence, on-policy share, temperature, generation cap."""
    if method == "traces":
        return {}
    beta = DEFAULT_BETA[method] if beta is None else beta
    if config_path(method, lmbda) == ON_POLICY:
        return {"beta": beta, "temperature": temperature, "max_completion_length": max_new_tokens}
    return {"beta": beta, "lmbda": lmbda if method == "on_policy" else 0.0,
            "temperature": temperature, "max_new_tokens": max_new_tokens, "seq_kd": False}


def _base_vocab(tokenizer) -> dict[str, int]:
    """Token -> id, without the added (special) tokens, which checkpoints often rename."""
    added = set(tokenizer.get_added_vocab())
    return {t: i for t, i in tokenizer.get_vocab().items() if t not in added}


def check_shared_vocabulary(teacher_tok, student_tok, teacher_width: int, student_width: int,
                            teacher: str, student: str) -> None:
    """UserError unless the logit methods can compare the two models token by token.

    The base vocabularies (added tokens aside) must map every token to the same id, and the
    student's output layer may not be wider than the teacher's (a narrower one is padded up, see
    `pad_to_teacher`). Added tokens that differ only draw a warning: the teacher reads the
    student's chat-template tokens by their id.
    """
    t_vocab, s_vocab = _base_vocab(teacher_tok), _base_vocab(student_tok)
    differ = sum(t_vocab.get(tok) != i for tok, i in s_vocab.items()) + len(set(t_vocab) - set(s_vocab))
    if differ:
        raise UserError(f"distill: method logits/on_policy needs one tokenizer for teacher and "
                        f"student; {teacher} and {student} differ on {differ} of "
                        f"{max(len(t_vocab), len(s_vocab))} tokens (use method: traces, which "
                        f"only needs the teacher's text)")
    if student_width > teacher_width:
        raise UserError(f"distill: the student's vocab_size {student_width} is wider than the "
                        f"teacher's {teacher_width}; logits/on_policy compare distributions over "
                        f"one vocabulary (use method: traces)")
    t_added, s_added = teacher_tok.get_added_vocab(), student_tok.get_added_vocab()
    renamed = sum(t_added.get(tok) != i for tok, i in s_added.items())
    if renamed:
        print(f"[posttrain] distill: {renamed} added token(s) of the student are not the "
              f"teacher's under the same id; the teacher reads the student's chat template as ids",
              file=sys.stderr)


def pad_to_teacher(student, teacher_width: int) -> None:
    """Widen the student's embeddings to the teacher's padded vocabulary size (e.g. Qwen2.5-1.5B's
    151936 rows against 152064 for 7B): rows past the tokenizer are never input, and as outputs
    they learn the teacher's near-zero mass there."""
    width = student.get_input_embeddings().weight.shape[0]
    if width < teacher_width:
        student.resize_token_embeddings(teacher_width, mean_resizing=False)
        print(f"[posttrain] distill: student vocabulary padded {width} -> {teacher_width} rows "
              f"to match the teacher's", file=sys.stderr)


def trainer_class(method: str, lmbda: float):
    """The TRL trainer a method runs (GKD's with the recipe's temperature in its divergence)."""
    if method == "traces":
        from trl import SFTTrainer
        return SFTTrainer
    if config_path(method, lmbda) == ON_POLICY:
        from trl import DistillationTrainer
        return DistillationTrainer
    from trl.experimental.gkd import GKDTrainer

    class TemperedGKDTrainer(GKDTrainer):
        """GKD whose divergence uses the config's temperature (TRL's only samples with it)."""

        def generalized_jsd_loss(self, student_logits, teacher_logits, **kwargs):
            kwargs.setdefault("temperature", self.temperature)
            return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, **kwargs)

    return TemperedGKDTrainer
