"""Deterministic featurisation of clinical notes, shared by the edge and the cloud.

The trainable text encoders of :mod:`protocols.model` need inputs that every hospital
computes identically without a shared, downloaded vocabulary. Words and word bigrams are
hashed (CRC-32, stable across processes and platforms, unlike Python's ``hash``) into a
fixed number of buckets, the "hashing trick" (Weinberger et al., 2009).

:class:`NgramBag` (the default encoder's input) counts the buckets of **every** word and
word pair of the whole note, however long; :class:`HashingTokenizer` (the transformer
option's input) keeps the first ``max_len - 1`` of them in order and drops the rest.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

#: Reserved ids: padding and the leading classification token every sequence starts with,
#: so that no sequence is all padding (an all-masked attention row would give NaN).
PAD_ID = 0
CLS_ID = 1
N_RESERVED = 2

_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def note_pieces(text: str, bigrams: bool = True) -> list[str]:
    """The lower-cased words of ``text`` in order, each followed by its pair with the next
    word when ``bigrams`` (so that "no chest pain" and "chest pain" differ)."""
    words = _WORD.findall(text.lower())
    out: list[str] = []
    for i, word in enumerate(words):
        out.append(word)
        if bigrams and i + 1 < len(words):
            out.append(f"{word} {words[i + 1]}")
    return out


def _crc_bucket(piece: str, first: int, buckets: int) -> int:
    return first + zlib.crc32(piece.encode("utf-8")) % buckets


@dataclass(frozen=True, slots=True)
class NgramBag:
    """How often each hashed bucket occurs among the words and word bigrams of a whole note.

    The input of the default text encoder (:class:`protocols.model.NgramBagEncoder`): a
    ``(vocab_size,)`` float32 count vector, so a note of any length is read to its end and
    the model's input has a fixed shape (for ONNX and for batching). Repeated words simply
    count more than once; no id is ever repeated within a row, which keeps per-patient
    gradients exact (a bag of repeated ids is where Opacus' ``EmbeddingBag`` grad sampler
    goes wrong).

    Parameters
    ----------
    vocab_size:
        Number of buckets; must match the model's ``text_vocab``.
    bigrams:
        Also count each pair of adjacent words.
    """

    vocab_size: int = 4096
    bigrams: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be at least 1, got {self.vocab_size}")

    def bucket(self, piece: str) -> int:
        return _crc_bucket(piece, 0, self.vocab_size)

    def encode(self, text: str | None) -> np.ndarray:
        """``(vocab_size,)`` float32 counts; all zeros for ``None`` or a note without words."""
        counts = np.zeros(self.vocab_size, dtype=np.float32)
        if text:
            ids = [self.bucket(p) for p in note_pieces(text, self.bigrams)]
            np.add.at(counts, np.asarray(ids, dtype=np.int64), 1.0)
        return counts

    def encode_batch(self, texts: list[str | None]) -> np.ndarray:
        """``(len(texts), vocab_size)`` float32 counts."""
        if not texts:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        return np.stack([self.encode(t) for t in texts])


@dataclass(frozen=True, slots=True)
class HashingTokenizer:
    """Lower-cased words and word bigrams hashed into ``vocab_size`` buckets, in order,
    truncated to ``max_len`` (the ``text_encoder="transformer"`` option's input).

    Parameters
    ----------
    vocab_size:
        Number of ids, reserved ones included; must match the model's embedding table.
    max_len:
        Length of every encoded sequence (``CLS`` first, padded with ``PAD_ID``).
    bigrams:
        Also emit one id per pair of adjacent words, so that "no chest pain" and
        "chest pain" differ.
    """

    vocab_size: int = 2048
    max_len: int = 64
    bigrams: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size <= N_RESERVED:
            raise ValueError(f"vocab_size must exceed {N_RESERVED}, got {self.vocab_size}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {self.max_len}")

    def _bucket(self, piece: str) -> int:
        return _crc_bucket(piece, N_RESERVED, self.vocab_size - N_RESERVED)

    def pieces(self, text: str) -> list[str]:
        """The words (and bigrams) of ``text`` in order, before hashing."""
        return note_pieces(text, self.bigrams)

    def encode(self, text: str | None) -> np.ndarray:
        """``(max_len,)`` int64 ids: ``CLS``, then the hashed pieces, then padding.

        ``None`` or empty text gives ``CLS`` followed by padding.
        """
        ids = np.full(self.max_len, PAD_ID, dtype=np.int64)
        ids[0] = CLS_ID
        if text:
            hashed = [self._bucket(p) for p in self.pieces(text)[: self.max_len - 1]]
            ids[1 : 1 + len(hashed)] = hashed
        return ids

    def encode_batch(self, texts: list[str | None]) -> np.ndarray:
        """``(len(texts), max_len)`` int64 ids."""
        if not texts:
            return np.zeros((0, self.max_len), dtype=np.int64)
        return np.stack([self.encode(t) for t in texts])
