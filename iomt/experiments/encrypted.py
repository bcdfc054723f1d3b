"""Source paper 002's encrypted inference: time and accuracy against image batch size
(1, 5, 10, 25) for ResNet-18 and AlexNet, through the cloud's real CrypTen path.

For each architecture: train the image model in plaintext on the pooled training images
(the experiment is about inference, not training), secret-share its weights among two cloud
parties exactly as secure aggregation publishes a global model
(:func:`cloud_aggregator.inference.publish.publish_shared_model`), start the parties and the
Beaver-triple provider as separate `iomt cloud` processes, and send batches of test images
as secret shares through the clinician's client
(:func:`cloud_aggregator.inference.client.predict`). Per batch we record the wall time, the
slowest party's compute time, accuracy against the labels, agreement with the plaintext
model's predictions on the same images, and the largest logit error.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np

from iomt.experiments import report
from iomt.experiments.data import split
from iomt.experiments.settings import Settings, load
from protocols.errors import IomtError

log = logging.getLogger(__name__)

BATCHES = (1, 5, 10, 25)
#: Per-request limit for the parties: a batch of 25 AlexNet images at 64x64 takes over 2
#: minutes on a 2-core CPU, past the service's default of 120 s.
REQUEST_TIMEOUT_S = 900.0
QUICK_BATCHES = (1, 2)
ARCHS = ("resnet18", "alexnet")
PARTIES = 2
READY_TIMEOUT_S = 300.0


class NotAvailable(IomtError):
    """The data set cannot feed this experiment (it has no images)."""


def _images(records) -> tuple[np.ndarray, np.ndarray]:
    recs = [r for r in records if r.image is not None and r.label is not None]
    if not recs:
        return np.zeros((0, 1, 1, 1), np.float32), np.zeros(0, np.int64)
    return (np.stack([r.image for r in recs])[:, None].astype(np.float32),
            np.array([int(r.label) for r in recs], np.int64))


def train_image_model(arch: str, x: np.ndarray, y: np.ndarray, num_classes: int, epochs: int, seed: int):
    """Plaintext Adam (lr 1e-3, batch 32) on the pooled training images; returns the eval-mode net."""
    import torch

    from protocols.vision import build_vision_model
    torch.manual_seed(seed)
    net = build_vision_model(arch, num_classes=num_classes, in_channels=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(32):
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def encrypted_inference(settings: Settings, batches: tuple[int, ...] | None = None, image_size: int | None = None,
                        archs: tuple[str, ...] = ARCHS, repeats: int | None = None) -> dict:
    import torch

    from cloud_aggregator.inference.client import predict
    from iomt.local_cloud import serving
    from protocols.model import state_to_numpy

    batches = batches or (QUICK_BATCHES if settings.quick else BATCHES)
    repeats = repeats or 1  # paper 002 averages 5 runs; MPC on two shared CPU cores is slow
    if settings.quick:  # ResNet-18 at 16x16 only (AlexNet needs at least 63x63): seconds, not minutes
        archs, image_size = ("resnet18",), image_size or 16
    epochs = 1 if settings.quick else 5
    runs: list[dict] = []
    for seed in range(settings.seeds):
        fed = load(settings, seed)
        s = split(fed, seed)
        x_train, y_train = _images(s.pooled("train") + s.pooled("val"))
        x_test, y_test = _images(s.pooled("test"))
        if not len(x_train) or not len(x_test):
            raise NotAvailable("encrypted_inference needs images: this data set has none")
        if image_size and image_size != x_train.shape[-1]:
            resize = torch.nn.functional.interpolate
            x_train, x_test = (resize(torch.from_numpy(a), size=(image_size, image_size), mode="bilinear").numpy()
                               for a in (x_train, x_test))
        size = int(x_train.shape[-1])
        for arch in archs:
            net = train_image_model(arch, x_train, y_train, len(fed.classes), epochs, seed)
            config = {"num_classes": len(fed.classes), "in_channels": 1, "image_size": size}
            with serving(arch, state_to_numpy(net), config, f"iomt-encrypted-{arch}-", PARTIES,
                         env={"IOMT_MPC_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S)}, timeout=READY_TIMEOUT_S) as cloud:
                rng = np.random.default_rng(seed)
                for batch in batches:
                    for rep in range(repeats):
                        idx = rng.choice(len(x_test), size=batch, replace=batch > len(x_test))
                        with torch.no_grad():
                            plain = net(torch.from_numpy(x_test[idx])).numpy()
                        start = time.perf_counter()
                        pred = predict(cloud.party_urls, cloud.signer(), {"image": x_test[idx]}, timeout=600)
                        wall = time.perf_counter() - start
                        logits = pred.outputs["logits"]
                        runs.append({
                            "seed": seed, "arch": arch, "batch": batch, "repeat": rep, "image_size": size,
                            "seconds": wall, "party_seconds": float(pred.seconds), "seconds_per_image": wall / batch,
                            "accuracy": float((logits.argmax(1) == y_test[idx]).mean()),
                            "plaintext_accuracy": float((plain.argmax(1) == y_test[idx]).mean()),
                            "agreement": float((logits.argmax(1) == plain.argmax(1)).mean()),
                            "max_logit_error": float(np.abs(logits - plain).max()),
                            "mpc_rounds": int(pred.rounds), "mpc_bytes": int(pred.bytes),
                        })
                        log.info("%s batch %d: %.2fs, agreement %.2f", arch, batch, wall, runs[-1]["agreement"])

    values = ("seconds", "party_seconds", "seconds_per_image", "accuracy", "plaintext_accuracy", "agreement",
              "max_logit_error", "mpc_bytes")

    def plot(summary):
        plt = report.pyplot()
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        for arch in archs:
            rows = [r for r in summary if r["arch"] == arch]
            xs = [r["batch"] for r in rows]
            a1.errorbar(xs, [r["seconds_mean"] for r in rows], yerr=[r["seconds_std"] for r in rows],
                        marker="o", capsize=3, label=arch)
            a2.plot(xs, [100 * r["accuracy_mean"] for r in rows], marker="o", label=f"{arch} encrypted")
            a2.plot(xs, [100 * r["agreement_mean"] for r in rows], marker="x", ls="--",
                    label=f"{arch} agreement with plaintext")
        a1.set_xlabel("images per request")
        a1.set_ylabel("encrypted inference time (s)")
        a1.legend()
        a2.set_xlabel("images per request")
        a2.set_ylabel("%")
        a2.legend(fontsize=7)
        fig.suptitle(f"Encrypted inference ({PARTIES} parties, CrypTen, {size}x{size} images)")
        fig.tight_layout()
        fig.savefig(settings.out / "encrypted_inference.png", dpi=110)
        plt.close(fig)

    payload = report.finish(settings, "encrypted_inference", runs, keys=("arch", "batch"), values=values,
                            run_columns=("seed", "arch", "batch", "repeat", "image_size", *values, "mpc_rounds"),
                            plot=plot)
    log.debug("%s", json.dumps(payload["summary"])[:200])
    return payload
