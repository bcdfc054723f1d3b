"""Encrypted inference end to end: real party processes (uvicorn), a real TTP process, 2 parties."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from cloud_aggregator.inference.client import predict
from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.inference.publish import publish_shared_model
from protocols.auth import Signer, make_credentials
from protocols.model import ModelConfig, build_model, state_to_numpy
from protocols.vision import fold_batchnorm, resnet18
from iomt.local_cloud import LocalCloud
from iomt.supervisor import run_iomt, wait_port
from tests.utils.text import random_tokens

pytestmark = pytest.mark.integration

torch.set_num_threads(1)


def Cloud(tmp, parties: int = 2) -> LocalCloud:  # noqa: N802 - reads as the class it builds
    """Two parties and the triples provider, each its own `iomt` process that dies with the test."""
    return LocalCloud(tmp, parties, ["hospital-a"], mpc=True)


@pytest.fixture
def fusion_cloud(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(dim=16)
    models = [build_model(cfg).eval() for _ in range(2)]
    cloud = Cloud(tmp_path)
    publish_shared_model(cloud.party_dirs, [state_to_numpy(m) for m in models], [40, 24], "multimodal",
                         json.loads(cfg.to_json()))
    avg = build_model(cfg).eval()
    sa, sb = state_to_numpy(models[0]), state_to_numpy(models[1])
    avg.load_state_dict({k: torch.from_numpy((40 * sa[k] + 24 * sb[k]) / 64) for k in sa}, strict=False)
    cloud.start()
    yield cloud, avg
    cloud.stop()


def _features(model, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality features the edge computes, and a random modality mask (>= 1 present)."""
    cfg = model.cfg
    with torch.no_grad():
        image = torch.randn(batch, 1, cfg.image_size, cfg.image_size, generator=gen)
        ehr = torch.randn(batch, cfg.ehr_dim, generator=gen)
        sig = torch.randn(batch, cfg.signal_len, cfg.signal_channels, generator=gen)
        tokens = random_tokens(cfg, batch, gen)
        feats = model.encode(image, ehr, sig, tokens)
    mask = (torch.rand(batch, 4, generator=gen) > 0.3).float()
    mask[mask.sum(1) == 0, 0] = 1.0
    return feats, mask


def test_fusion_head_matches_plaintext_and_cloud_never_sees_model(fusion_cloud):
    cloud, model = fusion_cloud
    gen = torch.Generator().manual_seed(7)
    feats, mask = _features(model, 25, gen)
    # Execute: three encrypted requests (batches 25, 25, 25 -> 75 cases)
    got_logits, got_w, ref_logits, ref_w = [], [], [], []
    for _ in range(3):
        feats, mask = _features(model, 25, gen)
        pred = predict(cloud.party_urls, cloud.signer(), {"features": feats.numpy(), "mask": mask.numpy()})
        with torch.no_grad():
            fused, weights = model.fusion(feats, mask)
            logits = model.head(fused)
        got_logits.append(pred.outputs["logits"]), got_w.append(pred.outputs["modality_weights"])
        ref_logits.append(logits.numpy()), ref_w.append(weights.numpy())
    got, ref = np.concatenate(got_logits), np.concatenate(ref_logits)
    assert np.abs(got - ref).max() < 1e-2
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    gw, rw = np.concatenate(got_w), np.concatenate(ref_w)
    assert np.abs(gw - rw).max() < 1e-2
    assert np.all(gw[rw == 0] == 0) or np.abs(gw[rw == 0]).max() < 1e-3  # absent modalities weigh nothing
    # Assert: no party holds the model in the clear; its share is not the plaintext S
    for d in cloud.party_dirs:
        assert not list(d.rglob("*.onnx")) and not list(d.rglob("*.pt"))
        with np.load(next(d.rglob("share.npz"))) as z:
            share = z["head.4.weight"].astype(np.float64) / 2**16 / 64
        assert np.abs(share - model.head[4].weight.detach().numpy()).min() > 1.0  # uniform ring noise
    # the audit log has who/when/which version, never content
    entries = [json.loads(x) for x in (cloud.party_dirs[1] / "audit" / "inference.jsonl").read_text().splitlines()]
    assert [e["client"] for e in entries] == ["hospital-a"] * 3 and all(e["model_version"] == 1 for e in entries)
    assert set(entries[0]) == {"time", "client", "request_id", "model_version", "status", "batch"}


def test_bad_inputs_get_clear_errors_and_service_survives(fusion_cloud, tmp_path):
    cloud, model = fusion_cloud
    feats, mask = _features(model, 2, torch.Generator().manual_seed(3))
    with pytest.raises(InferenceError) as err:  # wrong shape
        predict(cloud.party_urls, cloud.signer(), {"features": feats[:, :3].numpy(), "mask": mask.numpy()})
    assert err.value.reason == "bad_shape"
    with pytest.raises(InferenceError) as err:  # missing input
        predict(cloud.party_urls, cloud.signer(), {"features": feats.numpy()})
    assert err.value.reason == "bad_input"
    make_credentials(tmp_path / "other", ["intruder"], 2)  # a key the parties do not know
    intruder = Signer.from_file(tmp_path / "other" / "keys" / "intruder.json")
    with pytest.raises(InferenceError) as err:
        predict(cloud.party_urls, intruder, {"features": feats.numpy(), "mask": mask.numpy()})
    assert err.value.reason == "unauthorized"
    truncated = {"request_id": "abcdefgh12", "inputs": {"mask": {"shape": [2, 4], "data": "AAAA"}}}
    resp = httpx.post(f"{cloud.party_urls[0]}/inference/v1/predict", json=truncated,
                      headers=cloud.signer().headers("party-0"), timeout=30)
    assert resp.status_code == 400 and resp.json()["error"] == "truncated_share"
    # a share only party 1 ever receives: never scheduled by party 0 -> times out cleanly there
    # still serving
    pred = predict(cloud.party_urls, cloud.signer(), {"features": feats.numpy(), "mask": mask.numpy()})
    assert pred.outputs["logits"].shape == (2, 3)
    # and the command-line client gives the same answer
    np.savez(tmp_path / "case.npz", features=feats.numpy(), mask=mask.numpy())
    out = run_iomt("infer", "--patient", "p-1", "--input", str(tmp_path / "case.npz"),
                   "--parties", ",".join(cloud.party_urls),
                   "--key-file", str(tmp_path / "creds" / "keys" / "hospital-a.json"), "--json")
    result = json.loads(out.stdout)
    assert result["patient"] == "p-1" and len(result["probabilities"]) == 2
    np.testing.assert_allclose(list(result["probabilities"][0].values()), pred.probabilities[0], atol=1e-2)


def test_party_disappearing_mid_request_is_an_error_then_recovers(fusion_cloud):
    cloud, model = fusion_cloud
    feats, mask = _features(model, 2, torch.Generator().manual_seed(5))
    # party 1 dies: party 0 gets the share, the group breaks or party 1 never answers
    cloud.stop_party(1)
    with pytest.raises(InferenceError) as err:
        predict(cloud.party_urls, cloud.signer(), {"features": feats.numpy(), "mask": mask.numpy()}, timeout=60)
    assert err.value.reason in {"party_unreachable", "missing_share", "mpc_unavailable"}
    status = httpx.get(f"{cloud.party_urls[0]}/inference/v1/status", timeout=5).json()
    assert status["party"] == 0  # party 0's service is still up
    cloud.start_party(1)
    wait_port(cloud.party_ports[1], timeout=60)
    cloud.wait_ready()
    pred = predict(cloud.party_urls, cloud.signer(), {"features": feats.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        ref = model.head(model.fusion(feats, mask)[0]).numpy()
    assert np.abs(pred.outputs["logits"] - ref).max() < 1e-2


def test_resnet18_from_shares_matches_plaintext(tmp_path):
    """BatchNorm statistics like a trained net's (variances 0.05..25): the parties fold them into the
    convolutions on shares (version 1, an aggregate of two hospitals), or the publisher folded them in
    the clear (version 2); CrypTen's per-request BatchNorm was 5 % off at variance 0.05."""
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(4)
    nets = [resnet18(num_classes=3, in_channels=1).eval() for _ in range(2)]
    for net in nets:
        with torch.no_grad():
            for mod in net.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    n = mod.num_features
                    mod.running_mean.copy_(torch.randn(n, generator=gen))
                    mod.running_var.copy_(torch.exp(torch.empty(n).uniform_(-3.0, 3.2, generator=gen)))
                    mod.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
    states = [state_to_numpy(n) for n in nets]
    cloud = Cloud(tmp_path)
    config = {"num_classes": 3, "in_channels": 1, "image_size": 16}
    publish_shared_model(cloud.party_dirs, states, [3, 5], "resnet18", config)
    ref = resnet18(num_classes=3, in_channels=1).eval()
    ref.load_state_dict({k: torch.from_numpy((3 * states[0][k] + 5 * states[1][k]) / 8) for k in states[0]}, strict=False)
    publish_shared_model(cloud.party_dirs, [state_to_numpy(fold_batchnorm(ref))], [1], "resnet18",
                         dict(config, batchnorm_folded=True), version=2)
    cloud.start()
    try:
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        preds = [predict(cloud.party_urls, cloud.signer(), {"image": x.numpy()}, model_version=v) for v in (1, 2)]
    finally:
        cloud.stop()
    with torch.no_grad():
        expected = ref(x).numpy()
    for pred in preds:
        assert np.abs(pred.outputs["logits"] - expected).max() < 1e-2
        assert (pred.outputs["logits"].argmax(1) == expected.argmax(1)).all()
        assert pred.rounds > 0 and pred.bytes > 0
    assert [p.model_version for p in preds] == [1, 2]


def test_quadratic_fusion_head_end_to_end(tmp_path):
    """The MPC-friendly head through the real service: the client divides the scaled answer."""
    torch.manual_seed(3)
    cfg = ModelConfig(dim=16, fusion="quadratic")
    models = [build_model(cfg).eval() for _ in range(2)]
    states = [state_to_numpy(m) for m in models]
    cloud = Cloud(tmp_path)
    publish_shared_model(cloud.party_dirs, states, [10, 30], "multimodal", json.loads(cfg.to_json()))
    avg = build_model(cfg).eval()
    avg.load_state_dict({k: torch.from_numpy((10 * states[0][k] + 30 * states[1][k]) / 40) for k in states[0]},
                        strict=False)
    feats, mask = _features(avg, 10, torch.Generator().manual_seed(9))
    cloud.start()
    try:  # the first request fetches its triples from the TTP; the second finds them prefetched
        preds = [predict(cloud.party_urls, cloud.signer(), {"features": feats.numpy(), "mask": mask.numpy()})
                 for _ in range(2)]
    finally:
        cloud.stop()
    with torch.no_grad():
        fused, weights = avg.fusion(feats, mask)
        expected = avg.head(fused).numpy()
    pred = preds[1]
    assert set(pred.outputs) == {"logits", "modality_weights"}
    assert np.abs(pred.outputs["logits"] - expected).max() < 1e-2
    assert (pred.outputs["logits"].argmax(1) == expected.argmax(1)).all()
    assert np.abs(pred.outputs["modality_weights"] - weights.numpy()).max() < 1e-3
    assert pred.rounds == 12
