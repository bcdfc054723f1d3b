"""From :class:`PatientRecord` lists to the model's input tensors, and the split by patient.

All records are validated and stacked into dense tensors once (zeros where a modality is
missing, plus the modality mask), so that the training loop only indexes tensors: this is
what keeps it within a few percent of a bare PyTorch loop (``bench/bench_training.py``).
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from protocols.model import MINILM_DIM, ModelConfig
from protocols.schema import MODALITIES, PatientRecord

log = logging.getLogger(__name__)

#: At most this many signal windows per patient are kept (training draws one per epoch,
#: prediction averages over them).
MAX_WINDOWS = 8


@dataclass
class RecordTensors:
    """Dense model inputs for ``N`` patients.

    ``tokens`` holds what the model's text encoder reads: ``(N, text_vocab)`` float32
    bucket counts of each whole note (the default bag), ``(N, text_len)`` token ids
    (transformer), or ``(N, MINILM_DIM)`` float32 note embeddings (minilm).

    ``windows`` is ``(N, W, T, C)`` with ``n_windows`` valid windows per patient (at least
    one row, all zeros when signals are missing); ``labels`` is -1 where unknown.
    """

    patient_ids: list[str]
    image: torch.Tensor
    ehr: torch.Tensor
    windows: torch.Tensor
    n_windows: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def to(self, device: torch.device | str) -> RecordTensors:
        """The same data on ``device``."""
        move = {k: getattr(self, k).to(device) for k in
                ("image", "ehr", "windows", "n_windows", "tokens", "mask", "labels")}
        return RecordTensors(patient_ids=self.patient_ids, skipped=self.skipped, **move)

    def inputs(self, idx: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward inputs for patients ``idx`` using signal window ``window[i]`` of each."""
        return (self.image[idx], self.ehr[idx], self.windows[idx, window], self.tokens[idx], self.mask[idx])


def _problem(rec: PatientRecord, cfg: ModelConfig, need_label: bool) -> str | None:
    """Why ``rec`` cannot be used, or ``None`` if it can."""
    if need_label and rec.label is None:
        return "no_label"
    if rec.label is not None and not 0 <= int(rec.label) < cfg.num_classes:
        return "bad_label"
    if not rec.modalities():
        return "no_modality"
    if rec.image is not None:
        img = np.asarray(rec.image)
        if img.shape != (cfg.image_size, cfg.image_size) or not np.isfinite(img).all():
            return "bad_image"
    if rec.ehr is not None:
        ehr = np.asarray(rec.ehr, dtype=np.float64)
        if ehr.shape != (cfg.ehr_dim,) or np.isinf(ehr).any():
            return "bad_ehr"
    if rec.signal_windows is not None and len(rec.signal_windows) > 0:
        win = np.asarray(rec.signal_windows)
        if win.ndim != 3 or win.shape[1:] != (cfg.signal_len, cfg.signal_channels) or not np.isfinite(win).all():
            return "bad_signals"
    return None


def records_to_tensors(records: list[PatientRecord], cfg: ModelConfig, need_label: bool = True,
                       max_windows: int = MAX_WINDOWS) -> RecordTensors:
    """Validate and stack ``records``; unusable ones are skipped, counted and logged.

    Parameters
    ----------
    need_label:
        Skip records without a label (training and evaluation); prediction passes False.

    For a ``text_encoder="minilm"`` model the notes' embeddings come from
    ``rec.extra["text_embedding"]`` when present (the edge's text hook, or
    :func:`~edge_server.dataset.text_embedding.attach_note_embeddings` with an on-disk cache), and
    are computed by the frozen encoder otherwise (once per note and process).
    """
    skipped: Counter = Counter()
    kept: list[PatientRecord] = []
    for rec in records:
        reason = _problem(rec, cfg, need_label)
        if reason is None:
            kept.append(rec)
        else:
            skipped[reason] += 1
            log.warning("skipping record of patient %s: %s", rec.patient_id, reason)
    n, s = len(kept), cfg.image_size
    image = np.zeros((n, 1, s, s), np.float32)
    ehr = np.zeros((n, cfg.ehr_dim), np.float32)
    n_win = np.ones(n, np.int64)
    for i, rec in enumerate(kept):
        if rec.signal_windows is not None and len(rec.signal_windows) > 0:
            n_win[i] = min(len(rec.signal_windows), max_windows)
    windows = np.zeros((n, int(n_win.max()) if n else 1, cfg.signal_len, cfg.signal_channels), np.float32)
    mask = np.zeros((n, len(MODALITIES)), np.float32)
    labels = np.full(n, -1, np.int64)
    for i, rec in enumerate(kept):
        present = rec.modalities()
        mask[i] = [m in present for m in MODALITIES]
        if rec.image is not None:
            image[i, 0] = rec.image
        if rec.ehr is not None:
            ehr[i] = rec.ehr
        if "signals" in present:
            windows[i, : n_win[i]] = np.asarray(rec.signal_windows)[: n_win[i]]
        if rec.label is not None:
            labels[i] = int(rec.label)
    if cfg.text_encoder == "minilm":
        tokens = _note_embeddings(kept)
    else:  # bag: the whole note's bucket counts; transformer: its first text_len token ids
        tokens = cfg.tokenizer().encode_batch([rec.note for rec in kept])
    return RecordTensors(
        patient_ids=[rec.patient_id for rec in kept],
        image=torch.from_numpy(image), ehr=torch.from_numpy(ehr), windows=torch.from_numpy(windows),
        n_windows=torch.from_numpy(n_win), tokens=torch.from_numpy(tokens), mask=torch.from_numpy(mask),
        labels=torch.from_numpy(labels), skipped=skipped,
    )


def _note_embeddings(records: list[PatientRecord]) -> np.ndarray:
    """``(N, MINILM_DIM)`` embeddings; zeros where there is no note (the text mask is 0 there)."""
    from edge_server.dataset.text_embedding import embed_notes, precomputed

    out = np.zeros((len(records), MINILM_DIM), np.float32)
    todo: list[int] = []
    for i, rec in enumerate(records):
        if not rec.note:
            continue
        vec = precomputed(rec.extra)
        if vec is None:
            todo.append(i)
        else:
            out[i] = vec
    if todo:
        out[todo] = embed_notes([records[i].note for i in todo])
    return out


def split_records(records: list[PatientRecord], seed: int = 0,
                  fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
                  ) -> tuple[list[PatientRecord], list[PatientRecord], list[PatientRecord]]:
    """Split 70/15/15 into train, validation and test **by patient**, stratified by label.

    All records of one patient land in the same part; the split depends only on the
    patient ids, their labels and ``seed``.
    """
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    by_patient: dict[str, list[PatientRecord]] = defaultdict(list)
    for rec in records:
        by_patient[rec.patient_id].append(rec)
    by_label: dict[int, list[str]] = defaultdict(list)
    for pid in sorted(by_patient):
        label = by_patient[pid][0].label
        by_label[-1 if label is None else int(label)].append(pid)
    # Stratify: shuffle each class, give every patient its quantile within its class, and
    # cut the quantile-sorted list at 70% and 85%, so each part gets its share of each class.
    rng = np.random.default_rng(seed)
    ranked: list[tuple[float, float, str]] = []
    for label in sorted(by_label):
        pids = list(by_label[label])
        rng.shuffle(pids)
        ranked.extend(((i + 0.5) / len(pids), float(rng.random()), pid) for i, pid in enumerate(pids))
    ordered = [pid for _, _, pid in sorted(ranked)]
    n = len(ordered)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    parts = (ordered[:n_train], ordered[n_train:n_train + n_val], ordered[n_train + n_val:])
    train, val, test = ([rec for pid in sorted(p) for rec in by_patient[pid]] for p in parts)
    return train, val, test
