r"""Tiny random models for tests and smoke runs, and the word-level tokenizer they pair with."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from ..streams import MODEL_INIT

__all__ = ["word_vocabulary", "word_tokenizer", "tiny_bert", "tiny_llama"]

_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]")  # word_tokenizer's special tokens, ids 0..4


def word_vocabulary(texts: Iterable[str], *, vocab_size: int = 2000) -> list[str]:
    r"""The ``vocab_size - 5`` most frequent lower-cased words of ``texts``, most frequent first (ties: earlier word).

    The words of :func:`word_tokenizer` after its 5 special tokens. A function of every text, so in a federation
    the server computes it once and sends it to the nodes (:class:`~lowrank_fed.llm.federation.Shared`).
    """
    from tokenizers import pre_tokenizers

    counts: Counter = Counter()
    pre = pre_tokenizers.Whitespace()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])[: max(vocab_size - len(_SPECIALS), 0)]]


def word_tokenizer(texts: Iterable[str] | None = None, *, vocab_size: int = 2000, causal: bool = False,
                   words: Iterable[str] | None = None):
    r"""A lower-cased word-level fast tokenizer over the ``vocab_size`` most frequent words of ``texts``.

    Special tokens ``[PAD]`` (0), ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[EOS]``; BERT-style
    ``[CLS] x [SEP]`` unless ``causal``. Deterministic: ties in frequency go to the earlier word.
    ``words`` (instead of ``texts``): the vocabulary itself, as :func:`word_vocabulary` returns it.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if (texts is None) == (words is None):
        raise ValueError("word_tokenizer needs exactly one of 'texts' (to count words in) and 'words' (the vocabulary).")
    specials = list(_SPECIALS)
    words = word_vocabulary(texts, vocab_size=vocab_size) if words is None else list(words)
    pre = pre_tokenizers.Whitespace()
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    if not causal:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="[EOS]", model_max_length=512,
    )


def tiny_bert(num_labels: int, *, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised ``BertForSequenceClassification`` (seeded), for tests and smoke runs."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=512, num_labels=num_labels,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(MODEL_INIT.seed(seed))
        return BertForSequenceClassification(config)


def tiny_llama(*, vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised ``LlamaForCausalLM`` (seeded), for tests and smoke runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
        bos_token_id=None, eos_token_id=4, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(MODEL_INIT.seed(seed))
        return LlamaForCausalLM(config)
