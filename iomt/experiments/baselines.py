"""Classical baselines on the experiments' own splits: scikit-learn logistic regression on
simple features of each modality, pooled across hospitals or trained per hospital alone.

A floor under every number of `iomt experiment` (issue 17): if the multimodal network does
not beat a logistic regression on the same patients and features, its number says little.

Features (:func:`features`), from the preprocessed :class:`PatientRecord` the model itself sees:

- ``ehr``: the standardised EHR vector, a missing value as 0 (the reference mean) plus one
  indicator per feature that is missing somewhere in training;
- ``text``: TF-IDF of the note (words and word pairs, fitted on the training notes only);
- ``image``: the 64x64 normalised image average-pooled to 8x8 (64 intensities);
- ``signals``: per channel of the 25 Hz windows, the mean, the standard deviation and the
  log power in eight frequency bands (0-12.5 Hz), averaged over the patient's windows.

A patient lacking a modality gets zeros in its block and a 1 in the block's "absent"
column, so every test patient of a row is scored (the same patients as the model's row).
Every column but the TF-IDF ones is standardised on the training patients; the classifier is
``LogisticRegression(C=1.0, max_iter=2000)`` (L2, lbfgs, multinomial).

Pooled baselines train on every hospital's training patients; per-hospital baselines
train on one hospital's training patients alone. Where a table scores the pooled test set
(Tables II and III) a per-hospital row is the mean over hospitals of each hospital's model
scored on that pooled test set; :mod:`iomt.experiments.local_global` scores each hospital's
model on that hospital's own test patients.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from protocols.schema import MODALITIES, PatientRecord

log = logging.getLogger(__name__)

#: Inverse L2 strength of every baseline (scikit-learn's default).
C = 1.0
POOL = 8              # image side after average pooling
BANDS_HZ = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.5)
SIGNAL_HZ = 25.0
#: Baseline feature sets named in result tables: the issue's classical EHR / notes / both.
CLASSICAL: dict[str, tuple[str, ...]] = {"ehr": ("ehr",), "text": ("text",), "ehr+text": ("ehr", "text")}


def _image_block(rec: PatientRecord) -> np.ndarray | None:
    if rec.image is None:
        return None
    img = np.asarray(rec.image, dtype=np.float64)
    s = img.shape[0] // POOL
    return img[: s * POOL, : s * POOL].reshape(POOL, s, POOL, s).mean(axis=(1, 3)).ravel()


def _signal_block(rec: PatientRecord) -> np.ndarray | None:
    win = rec.signal_windows
    if win is None or len(win) == 0:
        return None
    x = np.asarray(win, dtype=np.float64)                        # (W, T, C)
    mean, std = x.mean(axis=1), x.std(axis=1)                     # (W, C)
    centred = x - mean[:, None, :]
    power = np.abs(np.fft.rfft(centred, axis=1)) ** 2             # (W, F, C)
    freqs = np.fft.rfftfreq(x.shape[1], d=1.0 / SIGNAL_HZ)
    total = power.sum(axis=1, keepdims=True) + 1e-12
    bands = [np.log(power[:, (freqs >= lo) & (freqs < hi), :].sum(axis=1) / total[:, 0] + 1e-6)
             for lo, hi in zip(BANDS_HZ[:-1], BANDS_HZ[1:])]
    feats = np.concatenate([mean, np.log(std + 1e-6), *bands], axis=1)   # (W, C * 10)
    return feats.mean(axis=0)


def _ehr_block(rec: PatientRecord) -> np.ndarray | None:
    if rec.ehr is None:
        return None
    return np.asarray(rec.ehr, dtype=np.float64)


_BLOCKS = {"image": _image_block, "ehr": _ehr_block, "signals": _signal_block}


class Features:
    """Fitted on training records; :meth:`transform` gives the same columns for any records."""

    def __init__(self, modalities: Sequence[str]):
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected some of {MODALITIES}")
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self._tfidf = None
        self._width: dict[str, int] = {}
        self._ehr_missing: np.ndarray | None = None
        self._scale: tuple[np.ndarray, np.ndarray] | None = None

    def fit(self, records: Sequence[PatientRecord]) -> Features:
        for m in self.modalities:
            if m == "text":
                from sklearn.feature_extraction.text import TfidfVectorizer
                notes = [r.note for r in records if r.note]
                self._tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1) if notes else None
                if self._tfidf is not None:
                    self._tfidf.fit(notes)
                continue
            blocks = [b for b in (_BLOCKS[m](r) for r in records) if b is not None]
            self._width[m] = len(blocks[0]) if blocks else 0
            if m == "ehr" and blocks:
                self._ehr_missing = np.isnan(np.stack(blocks)).any(axis=0)
        x, text = self._raw(records)
        mean, std = x.mean(axis=0), x.std(axis=0)
        # TF-IDF columns keep their own scale: standardising them would blow up rare n-grams.
        mean[text], std[text] = 0.0, 1.0
        self._scale = (mean, np.where(std > 1e-9, std, 1.0))
        return self

    def _raw(self, records: Sequence[PatientRecord]) -> tuple[np.ndarray, np.ndarray]:
        """The unscaled columns, and which of them are TF-IDF."""
        parts, text = [], []
        n = len(records)
        for m in self.modalities:
            if m == "text":
                if self._tfidf is None:
                    continue
                notes = [r.note or "" for r in records]
                parts.append(self._tfidf.transform(notes).toarray())
                text.append(np.ones(parts[-1].shape[1], dtype=bool))
                parts.append(np.array([[0.0 if r.note else 1.0] for r in records]))
                text.append(np.zeros(1, dtype=bool))
                continue
            width = self._width.get(m, 0)
            if not width:
                continue
            block = np.zeros((n, width))
            absent = np.ones((n, 1))
            for i, r in enumerate(records):
                b = _BLOCKS[m](r)
                if b is not None and len(b) == width:
                    block[i], absent[i] = b, 0.0
            if m == "ehr":
                missing = np.isnan(block)
                block = np.nan_to_num(block, nan=0.0)
                if self._ehr_missing is not None and self._ehr_missing.any():
                    parts.append(missing[:, self._ehr_missing].astype(float))
            parts.extend((block, absent))
        if not parts:
            return np.zeros((n, 0)), np.zeros(0, dtype=bool)
        x = np.concatenate(parts, axis=1)
        is_text = np.zeros(x.shape[1], dtype=bool)
        if text:  # TF-IDF and its absent flag are the last columns (text is the last modality)
            flags = np.concatenate(text)
            is_text[x.shape[1] - len(flags):] = flags
        return x, is_text

    def transform(self, records: Sequence[PatientRecord]) -> np.ndarray:
        x, _ = self._raw(records)
        if self._scale is None:
            raise RuntimeError("Features.transform before fit")
        return (x - self._scale[0]) / self._scale[1]


class Baseline:
    """Logistic regression on :class:`Features` of ``modalities`` for ``num_classes`` classes."""

    def __init__(self, modalities: Sequence[str], num_classes: int, c: float = C):
        self.features = Features(modalities)
        self.num_classes = num_classes
        self.c = c
        self._model = None
        self._constant: int | None = None

    def fit(self, records: Sequence[PatientRecord]) -> Baseline:
        records = [r for r in records if r.label is not None]
        if not records:
            raise ValueError("no labelled training records")
        y = np.array([int(r.label) for r in records])
        self.features.fit(records)
        x = self.features.transform(records)
        if len(np.unique(y)) < 2 or x.shape[1] == 0:
            # One class (a small, skewed hospital) or nothing to learn from: the training prior.
            self._constant = int(np.bincount(y, minlength=self.num_classes).argmax())
            return self
        from sklearn.linear_model import LogisticRegression
        self._model = LogisticRegression(C=self.c, max_iter=2000).fit(x, y)
        return self

    def predict_proba(self, records: Sequence[PatientRecord]) -> np.ndarray:
        """``(N, num_classes)`` probabilities; classes unseen in training get 0."""
        out = np.zeros((len(records), self.num_classes))
        if not records:
            return out
        if self._model is None:
            out[:, self._constant] = 1.0
            return out
        out[:, self._model.classes_] = self._model.predict_proba(self.features.transform(records))
        return out


def score(model: Baseline, records: Sequence[PatientRecord]) -> dict:
    """The experiments' metrics (``edge_server.training.metrics``) of ``model`` on labelled ``records``."""
    from edge_server.training.metrics import classification_metrics
    records = [r for r in records if r.label is not None]
    labels = np.array([int(r.label) for r in records], dtype=np.int64)
    return classification_metrics(labels, model.predict_proba(records))


def _has_any(records: Sequence[PatientRecord], modalities: Sequence[str]) -> bool:
    return any(m in r.modalities() for r in records for m in modalities)


def pooled(split, modalities: Sequence[str], num_classes: int) -> dict | None:
    """Metrics of one LR on every hospital's training patients, on the pooled test set
    (``None`` when no training patient has any of ``modalities``)."""
    train = split.pooled("train")
    if not _has_any(train, modalities):
        return None
    return score(Baseline(modalities, num_classes).fit(train), split.pooled("test"))


def per_hospital(split, modalities: Sequence[str], num_classes: int, test: str = "pooled") -> dict[str, dict]:
    """hospital -> metrics of an LR trained on that hospital's training patients alone, scored
    on the pooled test set (``test="pooled"``) or on the hospital's own test set (``"own"``)."""
    out = {}
    pooled_test = split.pooled("test")
    for h, train in split.train.items():
        if not [r for r in train if r.label is not None] or not _has_any(train, modalities):
            log.info("%s: no training patient with %s; no per-hospital baseline", h, modalities)
            continue
        records = pooled_test if test == "pooled" else split.test.get(h, [])
        if records:
            out[h] = score(Baseline(modalities, num_classes).fit(train), records)
    return out


def mean_metrics(per: dict[str, dict], metrics: Sequence[str]) -> dict:
    """Mean over hospitals of each metric (ignoring hospitals where it is undefined)."""
    out = {}
    for m in metrics:
        xs = [float(v[m]) for v in per.values() if v.get(m) is not None]
        out[m] = float(np.mean(xs)) if xs else float("nan")
    return out


def available(split, sets: dict[str, tuple[str, ...]] = CLASSICAL) -> dict[str, tuple[str, ...]]:
    """The feature sets of ``sets`` of which some training patient has every modality (e.g.
    ``ehr+text`` only where notes exist: a BYOD folder of tabular data has EHR alone)."""
    train = split.pooled("train")
    present = {m for r in train for m in r.modalities()}
    return {name: mods for name, mods in sets.items() if set(mods) <= present}


def rows(split, metrics: Sequence[str], num_classes: int,
         sets: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    """Result-table rows: ``lr_pooled`` and ``lr_per_hospital`` for every available feature set,
    each with ``features`` (the set's name), ``detail`` and the metrics (NaN where undefined)."""
    out = []
    for name, mods in available(split, sets or CLASSICAL).items():
        p = pooled(split, mods, num_classes)
        if p is not None:
            out.append({"baseline": "lr_pooled", "features": name,
                        "detail": f"logistic regression on {name}, all hospitals' training patients"}
                       | _floats(p, metrics))
        per = per_hospital(split, mods, num_classes, test="pooled")
        if per:
            out.append({"baseline": "lr_per_hospital", "features": name,
                        "detail": f"logistic regression on {name}, each hospital alone, mean of "
                                  f"{len(per)} hospitals on the pooled test set"}
                       | mean_metrics(per, metrics) | {"n": int(next(iter(per.values()))["n"])})
    return out


def _floats(m: dict, metrics: Sequence[str]) -> dict:
    return {k: float("nan") if m.get(k) is None else float(m[k]) for k in metrics} | {"n": int(m.get("n") or 0)}
