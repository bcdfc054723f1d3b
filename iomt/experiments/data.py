"""The data an experiment runs on: simulated hospitals or a bring-your-own-data folder,
split by patient into train / validation / test (70/15/15, or k-fold cross-validation)."""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.schema import CONDITIONS, EHR_DIM, MODALITIES, PatientRecord

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """Hospitals' preprocessed records plus what the model needs to know about them."""

    hospitals: dict[str, list[PatientRecord]]
    classes: tuple[str, ...] = CONDITIONS
    ehr_dim: int = EHR_DIM
    source: str = "simulated"

    def model_config(self, **overrides):
        """The experiments' model: the shared architecture sized to this data."""
        from protocols.model import ModelConfig
        return ModelConfig(num_classes=len(self.classes), ehr_dim=self.ehr_dim, **overrides)

    def present_modalities(self) -> tuple[str, ...]:
        seen = {m for recs in self.hospitals.values() for r in recs for m in r.modalities()}
        return tuple(m for m in MODALITIES if m in seen)


@dataclass
class Split:
    """One hospital-wise split: hospital -> records, for each part."""

    train: dict[str, list[PatientRecord]]
    val: dict[str, list[PatientRecord]]
    test: dict[str, list[PatientRecord]]

    def pooled(self, part: str) -> list[PatientRecord]:
        return [r for recs in getattr(self, part).values() for r in recs]


def hospital_names(n: int) -> list[str]:
    return [f"hospital-{i:02d}" for i in range(n)]


@functools.lru_cache(maxsize=4)
def _simulated(n_hospitals: int, n_patients: int, duration_s: float, seed: int) -> dict[str, tuple[PatientRecord, ...]]:
    from edge_server.dataset.preprocess import patient_record_from_raw
    from simulators.cohort import generate_cohort

    out: dict[str, tuple[PatientRecord, ...]] = {}
    for index, name in enumerate(hospital_names(n_hospitals)):
        patients = generate_cohort(name, n_patients, seed=seed, duration_s=duration_s, index=index)
        out[name] = tuple(patient_record_from_raw(p.patient_id, name, p.streams, p.image, p.ehr, p.note,
                                                  label=int(p.label)) for p in patients)
        log.info("simulated %s: %d patients", name, len(out[name]))
    return out


def simulated_federation(n_hospitals: int, n_patients: int, duration_s: float, seed: int) -> Federation:
    """``n_hospitals`` simulated hospitals (non-IID label mix and missing modalities from
    :func:`simulators.cohort.hospital_profile`), preprocessed by the edge's own code."""
    cached = _simulated(n_hospitals, n_patients, float(duration_s), seed)
    return Federation({h: list(recs) for h, recs in cached.items()})


def byod_federation(folder: Path | str, n_hospitals: int | None = None) -> Federation:
    """A bring-your-own-data folder of hospital folders (``docs/byod.md``)."""
    from edge_server.dataset.byod import load_federation_folder
    schema, hospitals = load_federation_folder(folder)
    if n_hospitals:
        hospitals = dict(list(hospitals.items())[:n_hospitals])
    return Federation(hospitals, classes=schema.classes, ehr_dim=schema.ehr_dim, source=str(folder))


def split(fed: Federation, seed: int, folds: int = 1, fold: int = 0) -> Split:
    """Per hospital, by patient: 70/15/15 (``folds == 1``), or fold ``fold`` of k-fold CV
    (test = fold k, validation = fold k+1, train = the rest)."""
    train, val, test = {}, {}, {}
    for h, recs in fed.hospitals.items():
        if folds <= 1:
            from edge_server.training.data import split_records
            parts = split_records(recs, seed=seed)
            train[h], val[h], test[h] = _parts(parts)
        else:
            order = np.random.default_rng([seed, _stable(h)]).permutation(len(recs))
            chunks = np.array_split(order, folds)
            te, va = set(chunks[fold % folds]), set(chunks[(fold + 1) % folds])
            test[h] = [recs[i] for i in sorted(te)]
            val[h] = [recs[i] for i in sorted(va)]
            train[h] = [recs[i] for i in order if i not in te and i not in va]
    return Split(train, val, test)


def _parts(parts) -> tuple[list, list, list]:
    if isinstance(parts, dict):
        return list(parts["train"]), list(parts["val"]), list(parts["test"])
    if hasattr(parts, "train"):
        return list(parts.train), list(parts.val), list(parts.test)
    a, b, c = parts
    return list(a), list(b), list(c)


def _stable(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % (2**31)


def restrict(records: list[PatientRecord], modalities: tuple[str, ...]) -> list[PatientRecord]:
    """Copies of ``records`` with every modality not in ``modalities`` removed; patients left
    with none of them are dropped (the model needs at least one present modality)."""
    keep = set(modalities)
    out = []
    for r in records:
        c = dataclasses.replace(
            r,
            image=r.image if "image" in keep else None,
            ehr=r.ehr if "ehr" in keep else None,
            signal_windows=r.signal_windows if "signals" in keep else None,
            note=r.note if "text" in keep else None,
        )
        if c.modalities():
            out.append(c)
    return out


def restrict_split(s: Split, modalities: tuple[str, ...]) -> Split:
    return Split(*({h: restrict(recs, modalities) for h, recs in getattr(s, part).items()}
                   for part in ("train", "val", "test")))
