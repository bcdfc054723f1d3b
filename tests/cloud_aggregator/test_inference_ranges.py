"""Encrypted inference refuses, never misanswers, outside its approximations' valid ranges (2 party processes)."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from cloud_aggregator.inference.client import predict
from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.inference.publish import publish_shared_model
from iomt.local_cloud import LocalCloud
from protocols.model import ModelConfig, build_model, state_to_numpy
from protocols.schema import CONDITIONS
from iomt.supervisor import run_iomt
from tests.utils.text import random_tokens

torch.set_num_threads(1)
pytestmark = pytest.mark.integration


def _model(seed: int, proj_scale: float = 1.0, score_scale: float = 1.0, fusion: str = "attention"):
    """A dim-16 model with its fusion projection / score vector scaled up."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(dim=16, fusion=fusion)).eval()
    with torch.no_grad():
        if fusion == "quadratic":
            model.fusion.score_weight.mul_(score_scale)
        else:
            model.fusion.proj.weight.mul_(proj_scale)
            model.fusion.score.weight.mul_(score_scale)
    return model


def _features(model, batch: int) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(11)
    cfg = model.cfg
    with torch.no_grad():
        feats = model.encode(torch.randn(batch, 1, cfg.image_size, cfg.image_size, generator=gen),
                             torch.randn(batch, cfg.ehr_dim, generator=gen),
                             torch.randn(batch, cfg.signal_len, cfg.signal_channels, generator=gen),
                             random_tokens(cfg, batch, gen))
    mask = torch.ones(batch, 4)
    mask[0, 3] = 0.0
    return feats.numpy(), mask.numpy()


def _plaintext(model, feats: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        fused, weights = model.fusion(torch.from_numpy(feats).float(), torch.from_numpy(mask).float())
        return model.head(fused).numpy(), weights.numpy()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranges")
    cloud = LocalCloud(tmp, 2, ["hospital-a"], mpc=True)
    # v1: tanh inputs in the thousands (as a DP-trained model's after 2 rounds); v2: scores
    # beyond the softmax's exp and reciprocal ranges (||v||_1 = 60)
    # v3: a plain attention model; v4: a quadratic head whose products pass 2^31
    models = {1: _model(1, proj_scale=2000.0), 2: _model(2, score_scale=0.0), 3: _model(3),
              4: _model(4, score_scale=1e5, fusion="quadratic")}
    with torch.no_grad():
        models[2].fusion.score.weight.fill_(60.0 / 16)
    for version, model in models.items():
        publish_shared_model(cloud.party_dirs, [state_to_numpy(model)], [1], "multimodal",
                             json.loads(model.cfg.to_json()), version=version)
    cloud.start()
    yield cloud, models, tmp
    cloud.stop()


def _infer(cloud, tmp, feats, mask, version: int):
    np.savez(tmp / f"case{version}.npz", features=feats, mask=mask)
    return run_iomt("infer", "--patient", "p-1", "--input", str(tmp / f"case{version}.npz"),
                    "--parties", ",".join(cloud.party_urls), "--model-version", str(version),
                    "--key-file", str(tmp / "creds" / "keys" / "hospital-a.json"), "--json", check=False)


def test_large_tanh_inputs_answer_as_plaintext(cloud):
    cloud, models, tmp = cloud
    feats, mask = _features(models[1], 4)
    ref_logits, ref_weights = _plaintext(models[1], feats, mask)
    with torch.no_grad():
        pre = models[1].fusion.proj(torch.from_numpy(feats).float()) + models[1].fusion.modality_embed
    assert pre.abs().max() > 1000  # far beyond the old tanh's valid |x| <= 56
    pred = predict(cloud.party_urls, cloud.signer(), {"features": feats, "mask": mask}, model_version=1)
    np.testing.assert_allclose(pred.outputs["modality_weights"], ref_weights, atol=1e-2)
    np.testing.assert_allclose(pred.outputs["logits"], ref_logits, atol=2e-2)
    out = _infer(cloud, tmp, feats, mask, 1)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prediction"] == [CONDITIONS[i] for i in ref_logits.argmax(1)]


def test_model_beyond_the_softmax_range_is_refused_with_a_reason(cloud):
    cloud, models, tmp = cloud
    feats, mask = _features(models[2], 4)
    with pytest.raises(InferenceError) as err:
        predict(cloud.party_urls, cloud.signer(), {"features": feats, "mask": mask}, model_version=2)
    assert err.value.reason == "model_out_of_range"
    out = _infer(cloud, tmp, feats, mask, 2)
    assert out.returncode == 3 and "model_out_of_range" in out.stderr and "||v||_1" in out.stderr
    assert out.stdout == ""  # no class printed
    # counted and audited at every party, and the service still answers for other versions
    for url, d in zip(cloud.party_urls, cloud.party_dirs):
        counters = httpx.get(f"{url}/inference/v1/status", timeout=10).json()["counters"]
        assert counters["rejected_model_out_of_range"] == 2
        statuses = [json.loads(x)["status"] for x in (d / "audit" / "inference.jsonl").read_text().splitlines()]
        assert statuses.count("model_out_of_range") == 2
    answer = predict(cloud.party_urls, cloud.signer(), {"features": feats, "mask": mask}, model_version=3)
    assert answer.model_version == 3


def _audit_lines(cloud) -> int:
    path = cloud.party_dirs[0] / "audit" / "inference.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_answers_outside_the_approximations_are_refused_at_the_client(cloud):
    cloud, models, tmp = cloud
    # fused features with variance > 300: beyond LayerNorm's encrypted 1/sqrt (valid to 200)
    feats, mask = _features(models[3], 2)
    feats = 50 * np.random.default_rng(0).standard_normal(feats.shape)
    out = _infer(cloud, tmp, feats, mask, 3)
    assert out.returncode == 3 and "answer_out_of_range" in out.stderr  # (garbage logits, here)
    assert out.stdout == ""
    # a quadratic head whose products wrap the 16-bit fixed point (scores ~ 1e3)
    feats, mask = _features(models[4], 2)
    with pytest.raises(InferenceError) as err:
        predict(cloud.party_urls, cloud.signer(), {"features": feats, "mask": mask}, model_version=4)
    assert err.value.reason in {"answer_out_of_range", "bad_answer"}
    # features beyond +-1024 never leave the client: exit 2, no party saw a request
    before = _audit_lines(cloud)
    out = _infer(cloud, tmp, feats * 1e4, mask, 3)
    assert out.returncode == 2 and "input_out_of_range" in out.stderr and out.stdout == ""
    assert _audit_lines(cloud) == before
    # and the service still answers a good query for a good model, as the plaintext model does
    feats, mask = _features(models[3], 2)
    pred = predict(cloud.party_urls, cloud.signer(), {"features": feats, "mask": mask}, model_version=3)
    ref_logits, ref_weights = _plaintext(models[3], feats, mask)
    np.testing.assert_allclose(pred.outputs["logits"], ref_logits, atol=1e-2)
