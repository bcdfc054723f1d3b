"""Secure aggregation against plaintext FedAvg, measured in the same run.

10 hospitals, one ResNet-18-sized update (protocols.vision.resnet18, ~11.2M parameters),
2 and 3 parties. Everything runs in this process with the production code paths
(fixed-point encoding, seed-compressed sharing, wire format, party summation,
reconstruction); HTTP/TLS transfer time is NOT included, bytes on the wire are reported.

Secure aggregation time of a party = ALL its aggregation work for the round: decoding each
upload and adding its share into the running sum (done as each upload arrives, see
cloud_aggregator/accumulator.py) plus the close-time step (RoundAccumulator.total), i.e.
everything except the disk writes, which plaintext FedAvg would also need. Parties run in
parallel on separate machines, so the slowest party counts. The close-time step alone (the
latency after the deadline) is reported separately.

A "round" here = local training (2 SGD steps of ResNet-18 on a batch of 32 64x64 images,
the same in both arms) + the hospital's upload preparation + all of the slowest party's
aggregation work (counted in full, although most of it overlaps other hospitals'
uploads) + the hospital's download preparation (reconstruction and decoding for SMPC,
nothing for plaintext).

Run: python bench/bench_secagg.py [--hospitals 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from protocols import fixedpoint, sharing
from protocols.aggregation_messages import RoundConfig, upload_from_wire
from protocols.auth import Signer
from protocols.params import flatten, normalise_spec, spec_hash, spec_of, unflatten
from protocols.vision import resnet18


def _best(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet18(num_classes=3, in_channels=1)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()
             if v.dtype.is_floating_point}
    spec = spec_of(state)
    size = sum(int(np.prod(s)) for _, s in spec)
    fp32_bytes = 4 * size
    rng = np.random.default_rng(0)
    base = flatten(state, spec, dtype=np.float32)
    updates = [base + rng.normal(0, 0.01, size).astype(np.float32) for _ in range(args.hospitals)]
    counts = [int(c) for c in rng.integers(50, 500, args.hospitals)]
    print(f"model: {size / 1e6:.2f}M parameters, fp32 {fp32_bytes / 1e6:.1f} MB; {args.hospitals} hospitals")

    # local training, identical in both arms
    x, y = torch.randn(32, 1, 64, 64), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train():
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    t_train, _ = _best(train, 1)

    # plaintext FedAvg: hospitals send fp32 bytes, the server decodes and averages
    plain_prep, plain_bodies = _best(lambda: [u.tobytes() for u in updates], 1)
    plain_prep /= args.hospitals

    def plain_fedavg():
        acc = np.zeros(size, np.float32)
        for body, n in zip(plain_bodies, counts):
            acc += np.float32(n) * np.frombuffer(body, np.float32)
        return acc / np.float32(sum(counts))
    t_plain, plain = _best(plain_fedavg, args.repeats)

    import os
    print(f"load average before: {os.getloadavg()}")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cloud_aggregator.accumulator import RoundAccumulator
    from edge_server.federation.client import FederatedClient
    rows = []
    for parties in (2, 3):
        cfg = RoundConfig(round=1, version=1, deadline=0, parties=parties,
                          spec=[(n, list(s)) for n, s in spec], spec_hash=spec_hash(spec))
        bodies, t_prep = [], 0.0
        for h, (u, n) in enumerate(zip(updates, counts)):
            client = FederatedClient(Signer(f"h{h}", "hospital", Ed25519PrivateKey.generate()), "https://unused")
            t = time.perf_counter()
            bodies.append(client.make_uploads(cfg, unflatten(u, normalise_spec(cfg.spec)), n))
            t_prep += time.perf_counter() - t
            client.close()
        t_prep /= args.hospitals
        upload_ratio = np.mean([sum(len(b) for b in bb) for bb in bodies]) / fp32_bytes

        names = [f"h{h}" for h in range(args.hospitals)]

        def party_sum(j):
            acc = RoundAccumulator()
            for bb in bodies:  # as each upload arrives
                acc.add(1, upload_from_wire(bb[j]))
            t = time.perf_counter()
            total = acc.total(1, size, names, load=None)  # every upload is in: nothing to load
            return total, time.perf_counter() - t
        party_times, close_times, shares = [], [], []
        for j in range(parties):
            t, (s, t_close) = _best(lambda: party_sum(j), args.repeats)
            party_times.append(t)
            close_times.append(t_close)
            shares.append(s)
        t_secure = max(party_times)
        t_recon, model_out = _best(lambda: fixedpoint.decode(sharing.reconstruct(shares), sum(counts),
                                                             dtype=np.float32), args.repeats)
        err = float(np.abs(model_out - plain).max())
        round_plain = t_train + plain_prep + t_plain
        round_secure = t_train + t_prep + t_secure + t_recon
        rows.append((parties, t_plain, t_secure, t_secure / t_plain, max(close_times), upload_ratio,
                     round_plain, round_secure, round_secure / round_plain, err, t_prep, t_recon))
    print(f"local training (2 ResNet-18 steps, batch 32): {t_train:.2f}s; plaintext FedAvg {t_plain:.3f}s")
    print("| parties | plaintext FedAvg s | secure agg s (slowest party) | ratio (target <= 3) | close step s "
          "| upload / fp32 (target <= 2.05) | round plain s | round SMPC s | round ratio (target <= 1.10) "
          "| max abs err | share prep s/hospital | reconstruct s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"load average after: {os.getloadavg()}")
    for r in rows:
        print("| {} | {:.3f} | {:.3f} | {:.2f}x | {:.3f} | {:.4f}x | {:.2f} | {:.2f} | {:.3f}x | {:.1e} | {:.3f} | {:.3f} |"
              .format(*r))


if __name__ == "__main__":
    main()
