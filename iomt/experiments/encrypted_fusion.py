"""Encrypted inference of the *multimodal* model, trained by a federation: both fusion heads.

Paper 002 measures encrypted inference on image models; this system's clinicians query the
multimodal global model, whose encoders run at the edge and whose fusion head runs under
MPC (README, "What runs encrypted"). For each seed and each fusion (the paper's attention,
and the MPC-friendly quadratic head): train the global model with FedAvg over the simulated
hospitals (the experiments' federation, `iomt.federation`), compute the held-out patients'
modality features as the edge does (one query row per patient, its first signal window),
secret-share the global model among two `iomt cloud` parties with the triple provider, and
send the test rows as shares in batches through the clinician's client. Per request: wall
time, the parties' compute time and rounds, agreement of the encrypted prediction with the
plaintext model's, the largest logit and modality-weight errors, and accuracy against the
labels. The first request of each batch shape fetches its Beaver triples from the provider;
later ones find them prefetched (the service's steady state). Each request is sent after a
pause, so that it meets an idle service, as a clinician's query does; back to back, a
request also waits for the previous one's triple refill.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from iomt.experiments import report
from iomt.experiments.settings import Settings, prepared_runs

log = logging.getLogger(__name__)

FUSIONS = ("attention", "quadratic")
BATCHES = (1, 5, 10, 25)
QUICK_BATCHES = (1, 2)
#: requests per (fusion, batch) at most; the test set is cycled when it is smaller
REQUESTS = 10
QUICK_REQUESTS = 3
#: pause before each request: a clinician's query meets an idle service, whose parties have
#: finished fetching the next request's triples (about 0.2-0.6 s after the attention head)
IDLE_S = 1.0
QUICK_IDLE_S = 0.2
PARTIES = 2
READY_TIMEOUT_S = 300.0


def _test_rows(model, records) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features (N, 4, dim), mask (N, 4), labels (N,))`` of the labelled test patients, window 0."""
    import torch

    from edge_server.training.data import records_to_tensors

    data = records_to_tensors(records, model.cfg)
    idx = torch.arange(len(data.labels))
    image, ehr, signals, tokens, mask = data.inputs(idx, torch.zeros_like(idx))
    with torch.no_grad():
        feats = model.encode(image, ehr, signals, tokens)
    return feats.numpy().astype(np.float64), mask.numpy().astype(np.float64), data.labels.numpy()


def _plaintext(model, feats: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        fused, weights = model.fusion(torch.from_numpy(feats).float(), torch.from_numpy(mask).float())
        return model.head(fused).numpy(), weights.numpy()


def encrypted_fusion(settings: Settings, batches: tuple[int, ...] | None = None,
                     fusions: tuple[str, ...] = FUSIONS) -> dict:
    from cloud_aggregator.inference.client import predict
    from iomt.federation import run_federation
    from iomt.local_cloud import serving
    from protocols.model import build_model, load_numpy_state

    batches = batches or (QUICK_BATCHES if settings.quick else BATCHES)
    requests = QUICK_REQUESTS if settings.quick else REQUESTS
    idle = QUICK_IDLE_S if settings.quick else IDLE_S
    runs: list[dict] = []
    for seed, fold, fed, base_cfg, s in prepared_runs(settings):
        for fusion in fusions:
            cfg = base_cfg.model_copy(update={"fusion": fusion})
            state = run_federation(cfg, s.train, settings.spec("fedavg", seed)).state
            model = load_numpy_state(build_model(cfg), state).eval()
            feats, mask, labels = _test_rows(model, s.pooled("test"))
            with serving("multimodal", state, cfg.model_dump(mode="json"), f"iomt-encrypted-fusion-{fusion}-",
                         PARTIES, timeout=READY_TIMEOUT_S) as cloud:
                for batch in batches:
                    for rep in range(requests):
                        idx = np.arange(rep * batch, (rep + 1) * batch) % len(labels)
                        ref_logits, ref_weights = _plaintext(model, feats[idx], mask[idx])
                        time.sleep(idle)
                        start = time.perf_counter()
                        pred = predict(cloud.party_urls, cloud.signer(), {"features": feats[idx], "mask": mask[idx]})
                        wall = time.perf_counter() - start
                        logits, weights = pred.outputs["logits"], pred.outputs["modality_weights"]
                        runs.append({
                            "seed": seed, "fold": fold, "fusion": fusion, "batch": batch, "repeat": rep,
                            "triples": "on-demand" if rep == 0 else "prefetched",
                            "seconds": wall, "party_seconds": float(pred.seconds), "mpc_rounds": int(pred.rounds),
                            "agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
                            "max_logit_error": float(np.abs(logits - ref_logits).max()),
                            "max_weight_error": float(np.abs(weights - ref_weights).max()),
                            "accuracy": float((logits.argmax(1) == labels[idx]).mean()),
                            "plaintext_accuracy": float((ref_logits.argmax(1) == labels[idx]).mean()),
                        })
                        log.info("%s batch %d request %d: %.3fs, %d rounds, agreement %.2f", fusion, batch, rep,
                                 wall, pred.rounds, runs[-1]["agreement"])

    values = ("seconds", "party_seconds", "mpc_rounds", "agreement", "max_logit_error", "max_weight_error",
              "accuracy", "plaintext_accuracy")

    def plot(summary):
        plt = report.pyplot()
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for fusion in fusions:
            rows = [r for r in summary if r["fusion"] == fusion and r["triples"] == "prefetched"] or \
                [r for r in summary if r["fusion"] == fusion]
            ax.errorbar([r["batch"] for r in rows], [1000 * r["seconds_mean"] for r in rows],
                        yerr=[1000 * r["seconds_std"] for r in rows], marker="o", capsize=3, label=fusion)
        ax.set_xlabel("query rows per request")
        ax.set_ylabel("encrypted request (ms, triples prefetched)")
        ax.set_yscale("log")
        ax.legend()
        fig.suptitle(f"Encrypted fusion head ({PARTIES} parties, CrypTen)")
        fig.tight_layout()
        fig.savefig(settings.out / "encrypted_fusion.png", dpi=110)
        plt.close(fig)

    return report.finish(settings, "encrypted_fusion", runs, keys=("fusion", "triples", "batch"), values=values,
                         run_columns=("seed", "fold", "fusion", "batch", "repeat", "triples", *values), plot=plot)
