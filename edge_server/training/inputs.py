"""What a training run needs from an edge's data directory: the model configuration that fits
it and its labelled patients, ready for the configured text encoder.

Shared by ``iomt edge train`` and ``iomt edge federate`` so both accept the same data
directories (an ingest store or a bring-your-own-data hospital folder, docs/byod.md) and the
same model options.
"""
from __future__ import annotations

import logging
from pathlib import Path

from protocols.model import ModelConfig
from protocols.schema import PatientRecord

log = logging.getLogger(__name__)


def model_config_for(data_dir: str | Path | None, **fields) -> ModelConfig:
    """``ModelConfig(**fields)`` with the widths a BYOD hospital folder fixes (EHR features,
    classes) when ``data_dir`` is one.

    Raises
    ------
    edge_server.dataset.byod.ByodError
        when ``data_dir`` is a BYOD folder whose ``dataset.json`` is invalid.
    """
    from edge_server.dataset.byod import is_hospital_folder, model_overrides
    if data_dir is not None and is_hospital_folder(data_dir):
        fields = {**fields, **model_overrides(data_dir)}
    return ModelConfig(**fields)


def labelled_records(data_dir: str | Path) -> list[PatientRecord]:
    """The patients of ``data_dir`` that carry a label (unlabelled ones cannot be trained on).

    Raises
    ------
    edge_server.dataset.byod.ByodError
        naming the offending file and row of a BYOD folder.
    """
    from edge_server.dataset.records import load_records
    records = load_records(data_dir)
    labelled = [r for r in records if r.label is not None]
    if len(labelled) < len(records):
        log.info("%s: %d of %d patients have no label and are left out of training",
                 data_dir, len(records) - len(labelled), len(records))
    return labelled


def prepare_text(records: list[PatientRecord], model_cfg: ModelConfig, data_dir: str | Path) -> None:
    """Attach the frozen MiniLM note embeddings a ``text_encoder="minilm"`` model reads
    (computed once per note, cached under ``DATA_DIR/text_embeddings``); nothing otherwise.

    Raises
    ------
    edge_server.dataset.text_embedding.TextEmbeddingUnavailable
        when the optional MiniLM package is not installed.
    """
    if model_cfg.text_encoder != "minilm":
        return
    from edge_server.dataset.text_embedding import CACHE_DIR, attach_note_embeddings
    attach_note_embeddings(records, cache_dir=Path(data_dir) / CACHE_DIR)
