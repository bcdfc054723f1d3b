"""A federated run of several rounds across 3 hospitals over real HTTPS on loopback, with
the project's multimodal model and DP local training: the global model gets better.

Each hospital is its own process (as in deployment): torch's RNG and thread state are
process-global, so hospitals sharing one process would perturb each other's training.
"""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from edge_server.training import ModelConfig, TrainConfig, evaluate, initial_state, train_local
from simulators.records import make_records

pytestmark = pytest.mark.integration

HOSPITALS = {"h1": 1, "h2": 2, "h3": 3}
ROUNDS = 3
INIT_SEED = 5
CFG = ModelConfig(dim=16, ehr_hidden=16, lstm_hidden=16, lstm_layers=1, text_layers=1, cnn_channels=(4, 8, 8))


def _hospital(h: str, key_file: str, coord_url: str, tls: dict):
    """One hospital's whole federation, in its own process."""
    torch.set_num_threads(1)
    from edge_server.federation.client import FederatedClient
    from protocols.auth import Signer
    data = make_records(45, seed=HOSPITALS[h], hospital=h, p_missing=0.3)

    def train_fn(global_state, rcfg):
        mcfg = ModelConfig.model_validate(rcfg.model.config)
        base = global_state if global_state is not None else initial_state(mcfg, rcfg.init_seed)
        tc = TrainConfig(epochs=5, seed=rcfg.round, prox_mu=rcfg.prox_mu, clip_norm=5.0,
                         noise_multiplier=0.001, dp_seed=rcfg.round * 10 + HOSPITALS[h])
        res = train_local(mcfg, base, data, tc, progress=False)
        return res.state, res.n_samples, res.metrics

    client = FederatedClient(Signer.from_file(key_file), coord_url, **tls)  # ca, its own cert and key, crl
    try:
        records, status = client.run(train_fn)
        meta, state = client.fetch_global(status.latest_version)
        return [r.round for r in records], meta, state
    finally:
        client.close()


def test_secret_shared_rounds_improve_validation_metrics(tmp_path: Path):
    from iomt.local_cloud import LocalCloud
    torch.set_num_threads(1)
    cluster = LocalCloud.secagg(tmp_path, 3, list(HOSPITALS), rounds=ROUNDS, round_timeout=120.0,
                                state=initial_state(CFG, INIT_SEED),
                                model={"arch": "multimodal", "config": CFG.model_dump(mode="json"),
                                       "init_seed": INIT_SEED}).start()
    try:
        with mp.get_context("spawn").Pool(len(HOSPITALS)) as pool:
            tls = {h: {"ca": cluster.tls["ca"], "cert": cluster.tls_hosts[h].tls_cert, "key": cluster.tls_hosts[h].tls_key,
                       "crl": cluster.tls["crl"]} for h in HOSPITALS}
            jobs = {h: pool.apply_async(_hospital, (h, str(tmp_path / f"creds/keys/{h}.json"), cluster.coord_url,
                                                    tls[h])) for h in HOSPITALS}
            results = {h: j.get(600) for h, j in jobs.items()}
        rounds, meta, state = results["h1"]
        assert rounds == list(range(1, ROUNDS + 1)), cluster.logs()
        assert meta["version"] == ROUNDS and meta["participants"] == sorted(HOSPITALS)
        assert {results[h][1]["sha256"] for h in HOSPITALS} == {meta["sha256"]}  # one model for all
        val = make_records(60, seed=100, hospital="val", p_missing=0.3)
        before = evaluate(CFG, initial_state(CFG, INIT_SEED), val)
        after = evaluate(CFG, state, val)
        assert after["accuracy"] >= before["accuracy"] + 0.1, (before, after)
        assert after["f1"] > before["f1"] and after["accuracy"] > after["majority_accuracy"] + 0.2
    finally:
        cluster.stop()
