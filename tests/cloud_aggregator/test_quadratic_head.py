"""The MPC-friendly fusion head (ModelConfig fusion="quadratic"), 2 CrypTen parties as processes.

Each party loads its own share of a global model averaged over two hospitals (as the worker
does) and evaluates the head on shares of the query; only this test reconstructs.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cloud_aggregator.crypten_compat import load_crypten
from cloud_aggregator.inference.client import prepare_inputs, unscale_outputs
from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.inference.publish import publish_shared_model, split_shares
from protocols.fixedpoint import decode, encode
from protocols.model import ModelConfig, build_model, load_numpy_state, state_to_numpy
from protocols.sharing import reconstruct

torch.set_num_threads(1)

BATCH = 24


def _party(dirs: list[str], inputs: list[dict[str, np.ndarray]], repeats: int) -> tuple[list[dict], int]:
    crypten = load_crypten()
    from crypten import communicator

    from cloud_aggregator.inference.models import load_encrypted_model
    from cloud_aggregator.store import load_global_share

    comm = communicator.get()
    crypten.cfg.communicator.verbose = True
    rank = comm.get_rank()
    meta, arrays = load_global_share(dirs[rank])
    model = load_encrypted_model(meta, arrays)
    enc = {k: crypten.mpc.MPCTensor.from_shares(torch.from_numpy(v)) for k, v in inputs[rank].items()}
    answers = []
    for _ in range(repeats):
        comm.reset_communication_stats()
        out = model.forward(enc)
        rounds = int(comm.get_communication_stats()["rounds"])
        answers.append({k: v._tensor.share.numpy().copy() for k, v in out.items()})
    return answers, rounds


def _averaged_model(cfg: ModelConfig, dirs) -> torch.nn.Module:
    """Publish the 40/24 average of two random hospital models; return it in the clear."""
    torch.manual_seed(11)
    states = []
    for _ in range(2):
        model = build_model(cfg)
        with torch.no_grad():  # scores of a few units, as after training, not ~1 as at initialisation
            model.fusion.score_weight.mul_(3.0)
        states.append(state_to_numpy(model))
    publish_shared_model(dirs, states, [40, 24], "multimodal", json.loads(cfg.to_json()))
    avg = {k: (40 * states[0][k] + 24 * states[1][k]) / 64 for k in states[0]}
    return load_numpy_state(build_model(cfg), avg).eval()


@pytest.mark.parametrize("parties", [2, 3])
def test_quadratic_head_matches_plaintext_in_12_rounds(tmp_path, parties):
    """12 rounds with 2 parties; with 3, CrypTen's truncations and comparison need more, same answer."""
    cfg = ModelConfig(dim=16, fusion="quadratic")
    dirs = [tmp_path / f"p{i}" for i in range(parties)]
    model = _averaged_model(cfg, dirs)
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(BATCH, 4, cfg.dim, generator=gen) * 2
    mask = (torch.rand(BATCH, 4, generator=gen) > 0.4).float()
    mask[mask.sum(1) == 0, 1] = 1.0
    query = prepare_inputs({"features": feats.numpy().astype(np.float64), "mask": mask.numpy().astype(np.float64)})
    shares = [{} for _ in dirs]
    for name, value in query.items():
        for i, part in enumerate(split_shares(encode(value), len(dirs))):
            shares[i][name] = part
    # Execute: the same query twice (a fresh random factor each time)
    results = load_crypten().mpc.run_multiprocess(world_size=parties)(_party)([str(d) for d in dirs], shares, 2)
    answers = [{k: decode(reconstruct([r[0][i][k] for r in results])) for k in results[0][0][i]} for i in range(2)]
    with torch.no_grad():
        fused, ref_weights = model.fusion(feats, mask)
        ref_logits = model.head(fused).numpy()
    # Assert: the client's unscaled answer is the plaintext model's (features of absent modalities
    # were zeroed by the client, which the plaintext model ignores anyway)
    assert results[0][1] == 12 if parties == 2 else results[0][1] > 12
    scales = []
    for raw in answers:
        got = unscale_outputs(raw)
        assert np.abs(got["logits"] - ref_logits).max() < 1e-3
        assert (got["logits"].argmax(1) == ref_logits.argmax(1)).all()
        assert np.abs(got["modality_weights"] - ref_weights.numpy()).max() < 1e-3
        assert np.abs(got["modality_weights"][mask.numpy() == 0]).max() < 1e-4
        # the parties' raw answer is scaled by r Z, r the sum of each party's draw in [1/4, 2]
        z = (mask * (1 + torch.einsum("bmd,md->bm", feats, model.fusion.score_weight.detach()) ** 2)).sum(1).numpy()
        r = raw["scaled_weights"].sum(1) / z
        assert (r > parties / 4 - 1e-3).all() and (r < 2 * parties + 1e-3).all()
        scales.append(r)
    assert np.abs(scales[0] - scales[1]).max() > 0.05  # a fresh factor per request


def test_client_prepares_fusion_queries_and_refuses_bad_masks():
    feats = np.ones((2, 4, 3))
    out = prepare_inputs({"features": feats, "mask": np.array([[1.0, 0, 1, 0], [0, 0, 0, 1]])})
    assert out["features"][0, 1].sum() == 0 and out["features"][0, 0].sum() == 3 and out["features"][1, :3].sum() == 0
    assert feats.sum() == 24  # the caller's array is not modified
    with pytest.raises(InferenceError, match="no modality"):
        prepare_inputs({"features": feats, "mask": np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]])})
    with pytest.raises(InferenceError, match="0 .* or 1"):
        prepare_inputs({"features": feats, "mask": np.full((2, 4), 0.7)})
    image = {"image": np.zeros((1, 1, 8, 8))}
    assert prepare_inputs(image) is image
    with pytest.raises(InferenceError) as err:
        unscale_outputs({"scaled_logits": np.ones((1, 3)), "logit_scale": np.zeros((1, 1)),
                         "scaled_weights": np.zeros((1, 4))})
    assert err.value.reason == "bad_answer"


def test_client_keeps_one_http_client_per_tls_setting():
    """Building an httpx client costs ~50 ms (its SSL context): the clinician's client keeps one."""
    import certifi

    from cloud_aggregator.inference.client import _http_client

    assert _http_client(True) is _http_client(True)
    assert _http_client(certifi.where()) is _http_client(certifi.where()) is not _http_client(True)
    assert not _http_client(True).is_closed
