"""Edge training throughput against a bare PyTorch loop on the same model and data, DP overhead,
and GPU throughput when CUDA is available.

Run: ``python bench/bench_training.py [--patients 256 --epochs 3 --repeats 3 --threads 1]``.
The edge figure is the whole :func:`train_local` call (tensor building, training, DP); the
baseline is the minimal Adam loop over pre-stacked tensors. Ratios are medians of the repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from edge_server.training import ModelConfig, TrainConfig, records_to_tensors, train_local  # noqa: E402
from protocols.model import build_model  # noqa: E402
from tests.utils.records import make_records  # noqa: E402


def bare_loop(cfg: ModelConfig, records, epochs: int, batch: int, device: torch.device) -> float:
    """Samples/s of the plainest loop: seed, build, Adam, forward/backward/step over index batches."""
    data = records_to_tensors(records, cfg).to(device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    n = len(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, device=device)
        for b in range(0, n, batch):
            idx = order[b:b + batch]
            logits, _ = model(*data.inputs(idx, torch.zeros_like(idx)))
            loss = loss_fn(logits, data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return epochs * n / (time.perf_counter() - start)


def edge_loop(cfg: ModelConfig, records, tc: TrainConfig) -> float:
    """Samples/s of the whole train_local call."""
    start = time.perf_counter()
    result = train_local(cfg, None, records, tc, progress=False)
    if tc.device.startswith("cuda"):
        torch.cuda.synchronize()
    return tc.epochs * result.n_samples / (time.perf_counter() - start)


def measure(device: str, patients: int, epochs: int, repeats: int) -> dict:
    cfg = ModelConfig()
    records = make_records(patients, seed=0)
    tc = TrainConfig(epochs=epochs, device=device)
    tc_dp = tc.model_copy(update={"clip_norm": 1.0, "noise_multiplier": 1.0, "dp_seed": 0})
    dev = torch.device(device)
    bare_loop(cfg, records[:32], 1, 32, dev)  # warm-up (allocator, kernels)
    runs = {"bare": [], "edge": [], "edge_dp": []}
    for _ in range(repeats):  # interleaved, so drift from other load hits all three alike
        runs["bare"].append(bare_loop(cfg, records, epochs, 32, dev))
        runs["edge"].append(edge_loop(cfg, records, tc))
        runs["edge_dp"].append(edge_loop(cfg, records, tc_dp))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "device": device, "patients": patients, "epochs": epochs, "repeats": repeats,
        "samples_per_s": med,
        "edge_vs_bare": med["edge"] / med["bare"],
        "dp_vs_no_dp": med["edge_dp"] / med["edge"],
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure("cpu", args.patients, args.epochs, args.repeats)]
    if torch.cuda.is_available():
        results.append(measure("cuda", args.patients * 4, args.epochs, args.repeats))
    else:
        print("no CUDA device: GPU throughput not measured")
    for r in results:
        s = r["samples_per_s"]
        print(f"[{r['device']}] {r['patients']} patients x {r['epochs']} epochs, median of {r['repeats']}: "
              f"bare {s['bare']:.1f} samples/s, edge {s['edge']:.1f}, edge+DP {s['edge_dp']:.1f}")
        print(f"[{r['device']}] edge / bare = {r['edge_vs_bare']:.3f} (target >= 0.9); "
              f"DP / no DP = {r['dp_vs_no_dp']:.3f}")
    if len(results) == 2:
        print(f"GPU / CPU edge throughput = {results[1]['samples_per_s']['edge'] / results[0]['samples_per_s']['edge']:.2f}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
