"""Random inputs for a model's text encoder, whatever the configured encoder reads."""
from __future__ import annotations

import torch

from protocols.model import MINILM_DIM, ModelConfig


def random_tokens(cfg: ModelConfig, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` rows of what ``cfg``'s text encoder takes as ``tokens``: bucket counts of 20
    random hashed pieces (bag), token ids (transformer) or a unit-norm embedding (minilm)."""
    if cfg.text_encoder == "bag":
        counts = torch.zeros(batch, cfg.text_vocab)
        counts.scatter_add_(1, torch.randint(0, cfg.text_vocab, (batch, 20), generator=gen), torch.ones(batch, 20))
        return counts
    if cfg.text_encoder == "minilm":
        emb = torch.randn(batch, MINILM_DIM, generator=gen)
        return emb / emb.norm(dim=1, keepdim=True)
    return torch.randint(2, cfg.text_vocab, (batch, cfg.text_len), generator=gen)
