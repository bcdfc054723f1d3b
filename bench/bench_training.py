"""Edge training throughput against a bare PyTorch loop on the same model and data, DP overhead,
and GPU throughput when CUDA is available.

Run: ``python bench/bench_training.py [--patients 256 --epochs 3 --repeats 3 --threads 1]``.
The edge figure is the whole :func:`train_local` call (tensor building, training, DP); the
baseline is the minimal Adam loop over pre-stacked tensors. Ratios are medians of the repeats.

Two clocks: wall time, and this process's CPU time (``time.process_time``). On a machine
shared with other work, CPU seconds are the fair measure of the work each loop does (with
one torch thread, waiting for a core does not count); on a quiet machine the two agree.
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
from simulators.records import make_records  # noqa: E402


class Clock:
    """Wall and process CPU time of a block."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def bare_loop(cfg: ModelConfig, records, epochs: int, batch: int, device: torch.device) -> tuple[float, float]:
    """Samples/s (wall, CPU) of the plainest loop: seed, build, Adam, forward/backward/step."""
    data = records_to_tensors(records, cfg).to(device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    n = len(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    with Clock() as clock:
        _bare_epochs(model, opt, loss_fn, data, epochs, batch, device)
    return epochs * n / clock.wall, epochs * n / clock.cpu


def _bare_epochs(model, opt, loss_fn, data, epochs: int, batch: int, device: torch.device) -> None:
    n = len(data)
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


def edge_loop(cfg: ModelConfig, records, tc: TrainConfig) -> tuple[float, float]:
    """Samples/s (wall, CPU) of the whole train_local call."""
    with Clock() as clock:
        result = train_local(cfg, None, records, tc, progress=False)
        if tc.device.startswith("cuda"):
            torch.cuda.synchronize()
    return tc.epochs * result.n_samples / clock.wall, tc.epochs * result.n_samples / clock.cpu


def measure(device: str, patients: int, epochs: int, repeats: int) -> dict:
    cfg = ModelConfig()
    records = make_records(patients, seed=0)
    tc = TrainConfig(epochs=epochs, device=device)
    tc_dp = tc.model_copy(update={"dp": "update", "clip_norm": 1.0, "noise_multiplier": 1.0, "dp_seed": 0})
    dev = torch.device(device)
    bare_loop(cfg, records[:32], 1, 32, dev)  # warm-up (allocator, kernels)
    runs = {"bare": [], "edge": [], "edge_dp": []}
    for _ in range(repeats):  # interleaved, so drift from other load hits all three alike
        runs["bare"].append(bare_loop(cfg, records, epochs, 32, dev))
        runs["edge"].append(edge_loop(cfg, records, tc))
        runs["edge_dp"].append(edge_loop(cfg, records, tc_dp))
    med = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    return {
        "device": device, "patients": patients, "epochs": epochs, "repeats": repeats,
        "samples_per_s": med, "samples_per_cpu_s": cpu,
        "edge_vs_bare": med["edge"] / med["bare"], "dp_vs_no_dp": med["edge_dp"] / med["edge"],
        "edge_vs_bare_cpu": cpu["edge"] / cpu["bare"], "dp_vs_no_dp_cpu": cpu["edge_dp"] / cpu["edge"],
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
        s, c = r["samples_per_s"], r["samples_per_cpu_s"]
        print(f"[{r['device']}] {r['patients']} patients x {r['epochs']} epochs, median of {r['repeats']}")
        print(f"  wall: bare {s['bare']:.1f} samples/s, edge {s['edge']:.1f}, edge+DP {s['edge_dp']:.1f}; "
              f"edge / bare = {r['edge_vs_bare']:.3f} (target >= 0.9), DP / no DP = {r['dp_vs_no_dp']:.3f}")
        print(f"  CPU:  bare {c['bare']:.1f} samples/cpu-s, edge {c['edge']:.1f}, edge+DP {c['edge_dp']:.1f}; "
              f"edge / bare = {r['edge_vs_bare_cpu']:.3f} (target >= 0.9), DP / no DP = {r['dp_vs_no_dp_cpu']:.3f}")
    if len(results) == 2:
        print(f"GPU / CPU edge throughput = {results[1]['samples_per_s']['edge'] / results[0]['samples_per_s']['edge']:.2f}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
