"""Encrypted-inference latency: 2 CrypTen parties + TTP as separate processes on this host.

Per image latency vs batch size, communication (rounds, bytes summed over parties) and the
ratio to plaintext PyTorch inference of the same model in the same run; with Beaver triples
fetched from the TTP on demand and prefetched while the parties are idle (the online phase
alone; the bench pauses ``--idle`` seconds between requests so that the refill is done). Image side and
models are arguments because a 224x224 ResNet-18 takes minutes per image on a small CPU.

    python bench/bench_inference.py --models fusion,fusion-quadratic,resnet18 --side 224 --batches 1,5,10,25

``fusion`` is the multimodal model's attention fusion and head (the paper's); ``fusion-quadratic``
the MPC-friendly variant (``ModelConfig(fusion="quadratic")``).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_aggregator.inference.client import unscale_outputs  # noqa: E402
from cloud_aggregator.mpc.provider import serve_once  # noqa: E402
from cloud_aggregator.inference.publish import publish_shared_model, split_shares  # noqa: E402
from cloud_aggregator.inference.handler import InferenceHandler  # noqa: E402
from cloud_aggregator.mpc import Job, JobKind, WorkerConfig, WorkerSupervisor  # noqa: E402
from protocols.fixedpoint import decode, encode  # noqa: E402
from protocols.model import ModelConfig, build_model, state_to_numpy  # noqa: E402
from protocols.sharing import reconstruct  # noqa: E402
from protocols.vision import build_vision_model  # noqa: E402


#: bench model name -> ModelConfig.fusion of the multimodal model's encrypted head
FUSION_MODELS = {"fusion": "attention", "fusion-quadratic": "quadratic"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_model(name: str, side: int, batches: list[int], device: str, repeats: int,
                prefetch: bool = True, idle: float = 0.0) -> list[dict]:
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-inf-"))
    dirs = [tmp / "p0", tmp / "p1"]
    if name in FUSION_MODELS:
        cfg = ModelConfig(dim=32, fusion=FUSION_MODELS[name])
        model = build_model(cfg).eval()
        publish_shared_model(dirs, [state_to_numpy(model)], [1], "multimodal", json.loads(cfg.to_json()))

        def make(b):  # every modality present
            return {"features": torch.randn(b, 4, cfg.dim), "mask": torch.ones(b, 4)}

        def plain(x):
            return model.head(model.fusion(x["features"], x["mask"])[0])
    else:
        model = build_vision_model(name, num_classes=1000, in_channels=3).eval()
        publish_shared_model(dirs, [state_to_numpy(model)], [1], name,
                             {"num_classes": 1000, "in_channels": 3, "image_size": side})

        def make(b):
            return {"image": torch.randn(b, 3, side, side)}

        def plain(x):
            return model(x["image"])
    master = f"127.0.0.1:{_free_port()}"
    ttp = mp.get_context("spawn").Process(target=serve_once, args=(2, master), daemon=True)
    ttp.start()
    sups = [WorkerSupervisor(WorkerConfig(i, 2, master, str(dirs[i]), device=device, threads=1,
                                          prefetch_triples=prefetch), {JobKind.INFER: InferenceHandler()}).start()
            for i in range(2)]
    rows = []
    try:
        while not all(s.ready for s in sups):
            time.sleep(0.1)
        counter = 0
        for b in batches:
            x = make(b)
            shares = {k: split_shares(encode(v.numpy()), 2) for k, v in x.items()}
            times, info = [], None
            for rep in range(repeats + 1):  # first request per batch shape builds/loads (warm-up)
                counter += 1
                time.sleep(idle)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    futs = [pool.submit(s.submit, Job(f"bench{counter:06d}", "bench", None,
                                                      {k: v[i] for k, v in shares.items()}), 3600)
                            for i, s in enumerate(sups)]
                    res = [f.result() for f in futs]
                if rep:
                    times.append(time.perf_counter() - t0)
                info = res
            outputs = {k: decode(reconstruct([r[0][k] for r in info])) for k in info[0][0]}
            logits = unscale_outputs(outputs)["logits"]
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = plain(x).numpy()
            t_plain = time.perf_counter() - t0
            enc = float(np.median(times))
            rows.append({"model": name, "side": side if name not in FUSION_MODELS else None, "batch": b, "device": device,
                         "triples": "prefetched" if prefetch else "on-demand",
                         "party_s": float(np.median([r[1]["seconds"] for r in info])),
                         "encrypted_s": enc, "encrypted_s_p90": float(np.percentile(times, 90)),
                         "encrypted_s_per_item": enc / b, "plaintext_s": t_plain,
                         "ratio": enc / max(t_plain, 1e-9), "rounds": info[0][1]["rounds"],
                         "bytes": sum(r[1]["bytes"] for r in info), "max_abs_err": float(np.abs(logits - ref).max())})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for s in sups:
            s.stop()
        ttp.kill()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fusion,resnet18")
    ap.add_argument("--side", type=int, default=64, help="image side (paper: 224)")
    ap.add_argument("--batches", default="1,5,10,25")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--triples", default="on-demand,prefetched",
                    help="comma list: on-demand (fetched from the TTP during the request), prefetched")
    ap.add_argument("--idle", type=float, default=3.0,
                    help="pause before each request, so that the previous refill of triples is done")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    for name in args.models.split(","):
        for mode in args.triples.split(","):
            bench_model(name, args.side, batches, args.device, args.repeats, mode == "prefetched", args.idle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
