"""Source paper 002's encrypted inference: time and accuracy against image batch size
(1, 5, 10, 25) for ResNet-18 and AlexNet, through the cloud's CrypTen inference path."""
from __future__ import annotations

import logging

from iomt.experiments.settings import Settings
from protocols.errors import IomtError

log = logging.getLogger(__name__)

BATCHES = (1, 5, 10, 25)
ARCHS = ("resnet18", "alexnet")


class NotAvailable(IomtError):
    """The encrypted inference path this experiment drives is not usable in this checkout."""


def encrypted_inference(settings: Settings, batches: tuple[int, ...] = BATCHES, image_size: int | None = None) -> dict:
    try:
        from cloud_aggregator.inference import bench as inference_bench  # noqa: F401
    except ImportError as err:
        raise NotAvailable(
            "encrypted_inference is not yet available: it drives the cloud's CrypTen inference "
            f"benchmark (cloud_aggregator.inference), which cannot be imported here ({err})") from err
    raise NotAvailable("encrypted_inference is not yet available")
