"""Patient-level DP-SGD training throughput and memory peak against non-private training of the
same model on the same patients, in the same run (target: DP-SGD at >= 0.5x).

Run: ``python bench/bench_dpsgd.py [--patients 128 --epochs 2 --repeats 3 --threads 1 --json]``.

Each measurement is a whole :func:`train_local` call in a fresh child process, so that its
peak resident memory (``ru_maxrss``; on CUDA also torch's peak allocation) is its own; the two
modes alternate, so drift from other load hits both alike. DP-SGD's samples are the patients
its Poisson samples drew (expected ``epochs x N``). Figures are medians of the repeats; CPU
seconds (``time.process_time``) are the fair measure on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(mode: str, patients: int, epochs: int, threads: int, device: str) -> dict:
    """One train_local call; samples/s (wall, CPU) and memory peaks."""
    import torch

    from edge_server.training import ModelConfig, TrainConfig, train_local
    from simulators.records import make_records

    torch.set_num_threads(threads)
    records = make_records(patients, seed=0)
    dp = {"dp": "sgd", "clip_norm": 1.0, "noise_multiplier": 1.0} if mode == "sgd" else {"dp": "off"}
    tc = TrainConfig(epochs=epochs, device=device, **dp)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_local(ModelConfig(), None, records, tc, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples = result.metrics.get("patients_sampled", epochs * result.n_samples)
    out = {"mode": mode, "samples": samples, "wall_s": wall, "cpu_s": cpu, "samples_per_s": samples / wall,
           "samples_per_cpu_s": samples / cpu, "rss_before_mb": rss0 / 1024,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=("off", "sgd"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.patients, args.epochs, args.threads, args.device)))
        return 0
    runs: dict[str, list[dict]] = {"off": [], "sgd": []}
    for _ in range(args.repeats):
        for mode in ("off", "sgd"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--patients", str(args.patients),
                                   "--epochs", str(args.epochs), "--threads", str(args.threads),
                                   "--device", args.device], capture_output=True, text=True, check=True, cwd=ROOT)
            runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "mode"} for m, rs in runs.items()}
    result = {"patients": args.patients, "epochs": args.epochs, "repeats": args.repeats, "threads": args.threads,
              "device": args.device, "median": med,
              "dpsgd_vs_plain_wall": med["sgd"]["samples_per_s"] / med["off"]["samples_per_s"],
              "dpsgd_vs_plain_cpu": med["sgd"]["samples_per_cpu_s"] / med["off"]["samples_per_cpu_s"],
              "runs": runs}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for m, label in (("off", "non-private"), ("sgd", "DP-SGD")):
        r = med[m]
        print(f"{label:12} {r['samples_per_s']:8.1f} samples/s wall  {r['samples_per_cpu_s']:8.1f} per CPU s  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB" + (f"  CUDA {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else ""))
    print(f"DP-SGD / non-private: {result['dpsgd_vs_plain_wall']:.2f}x wall, {result['dpsgd_vs_plain_cpu']:.2f}x CPU "
          "(target >= 0.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
