from __future__ import annotations

import os

import pytest

from iomt.local_broker import Mosquitto

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def mosquitto(tmp_path):
    """A real Mosquitto broker on a free loopback port, stopped after the test."""
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.skip_marker = skip
                item.add_marker(skip)
