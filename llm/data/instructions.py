r"""Instruction tuning on a user's data: ``prompt -> response`` examples, the loss on the response tokens only.

One example is the token ids ``p + r`` of its prompt and its response, encoded apart (so the boundary is exact):

- **prompt** ``p``: with a chat template (``tokenizer.chat_template`` set), the text of
  ``tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)`` tokenised without special
  tokens (the template writes its own), where ``turns`` are the row's turns before the response (``messages``) or
  ``[{"role": "user", "content": prompt}]``; without a template, ``prompt + "\n"``;
- **response** ``r``: the response's tokens (no special tokens), then ``eos``.

``labels`` are ``-100`` on the prompt and the padding and equal ``input_ids`` on ``r``, so the causal-LM loss is
``L = -(1/|R|) sum_{(i, t) in R} log p(x_{i,t} | x_{i,<t})`` over the response positions ``R`` of the batch only.

**Truncation** (never a refusal): an example longer than ``max_length`` tokens keeps its whole response and the
*last* ``max_length - |r|`` prompt tokens (the prompt is cut from the left: the tokens nearest the response, the
template's assistant header included, stay); a response that alone leaves no room for one prompt token keeps its
first ``max_length - 2`` tokens and ``eos``. :func:`count_truncated` counts the examples so cut (``setup.json``'s
``truncated_examples``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .encoding import pack_prompts

__all__ = ["instruction_ids", "encode_instructions", "count_truncated", "has_chat_template"]


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` formats chats itself (a non-empty ``chat_template``)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _prompt_ids(tokenizer, text: str, turns: Sequence[dict] | None) -> list[int]:
    if has_chat_template(tokenizer):
        chat = list(turns) if turns is not None else [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text + "\n", add_special_tokens=False)["input_ids"])


def instruction_ids(tokenizer, text: str, target: str, max_length: int, turns: Sequence[dict] | None = None
                    ) -> tuple[list[int], list[int], bool]:
    r"""``(p, r, truncated)``: one example's prompt and response token ids (``r`` ends in ``eos``), cut to
    ``len(p) + len(r) <= max_length`` as the module says, and whether anything was cut.

    Raises
    ------
    ValueError
        The tokenizer has no ``eos_token_id``, or ``max_length < 2`` (no room for a prompt token and ``eos``).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("Instruction tuning needs a tokenizer with an end-of-sequence token (eos_token_id is None).")
    if max_length < 2:
        raise ValueError(f"Instruction tuning needs max_length >= 2 (a prompt token and eos); got {max_length}.")
    p = _prompt_ids(tokenizer, text, turns)
    r = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [eos]
    if len(p) + len(r) <= max_length:
        return p, r, False
    if len(r) > max_length - 1:
        r = r[: max_length - 2] + [eos]
    return p[len(p) - (max_length - len(r)):], r, True


def _rows(tokenizer, examples, max_length: int):
    turns = examples.turns if examples.turns is not None else [None] * len(examples)
    return [instruction_ids(tokenizer, text, target, max_length, t)
            for text, target, t in zip(examples.texts, examples.targets, turns, strict=True)]


def count_truncated(tokenizer, examples, max_length: int) -> int:
    """How many of ``examples`` (a generation :class:`~.texts.TextDataset`) :func:`instruction_ids` cuts."""
    return sum(cut for _, _, cut in _rows(tokenizer, examples, max_length))


def encode_instructions(tokenizer, examples, max_length: int) -> dict[str, torch.Tensor]:
    r"""A user's generation examples as model inputs (the keys of
    :func:`~.encoding.encode_generation`): ``input_ids`` ``p + r`` and ``attention_mask`` right-padded, ``labels``
    ``-100`` except on ``r``, and ``prompt_ids`` / ``prompt_mask`` (``p`` left-padded, for greedy generation)."""
    rows = _rows(tokenizer, examples, max_length)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return pack_prompts([(p, r) for p, r, _ in rows], pad)
