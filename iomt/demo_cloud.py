"""The cloud half of `iomt demo`: parties, triple provider, coordinator, federated rounds
and a clinician's encrypted inference, each role in its own process."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from iomt.supervisor import ChildFailed, Supervisor, iomt_argv

ROUND_TIMEOUT_S = 900.0
POLL_S = 1.0


def run_cloud(args, out: Path, hospitals: list[str], edges: dict[str, Path], sup: Supervisor,
              say: Callable[[str], None]) -> dict:
    from iomt.local_cloud import LocalCloud

    model_file = out / "cloud" / "model.json"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    sup.run("write-model", iomt_argv("edge", "federate", "--write-model", str(model_file),
                                     "--fusion", args.fusion, "--seed", str(args.seed)))
    # parties (each starts its CrypTen worker), the triple provider, the coordinator
    cloud = LocalCloud(out / "cloud", args.parties, hospitals, model=model_file, mpc=True, tls=True,
                       rounds=args.rounds, round_timeout=ROUND_TIMEOUT_S, sup=sup)
    tls, coord_url, party_urls = cloud.tls, cloud.coord_url, cloud.party_urls
    cloud.start(wait_mpc=False)
    say(f"cloud up: {args.parties} parties, triple provider, coordinator (mutual TLS: each its own "
        "certificate; signed tokens)")

    # federated rounds: one `iomt edge federate` per hospital -------------------------------
    fed = {}
    for h in hospitals:
        fed[h] = sup.start(f"federate-{h}", iomt_argv(
            "edge", "federate", "--data-dir", str(edges[h]), "--key-file", str(cloud.key_file(h)),
            "--coordinator", coord_url, *cloud.client_tls_args(h), "--epochs", str(args.epochs),
            "--seed", str(args.seed), *_dp_argv(args), "--json"), daemon=False)
    _watch_rounds(sup, fed, cloud.client(hospitals[0]), args.rounds, say)
    results = {}
    for h, child in fed.items():
        if child.proc.wait() != 0:
            raise ChildFailed(f"federated client of {h} exited with {child.proc.returncode}:\n{sup.tail(child)}")
        lines = [ln for ln in child.log_path.read_text().splitlines() if ln.startswith("{")]
        results[h] = json.loads(lines[-1])
    say("federated training done: " + ", ".join(
        f"{h} val acc {r.get('global', {}).get('val', {}).get('accuracy', float('nan')):.2f}"
        for h, r in results.items()))

    from iomt.demo_infer import clinician_inference
    inference = clinician_inference(out, hospitals[0], edges[hospitals[0]], cloud, args.seed, sup, say)
    return {"cloud": {"parties": args.parties, "party_urls": party_urls, "coordinator": coord_url,
                      "ca": str(tls["ca"]), "crl": str(tls["crl"]),
                      "tls_hosts": str(out / "cloud" / "tls" / "hosts")},
            "federation": results, "inference": inference}


def _dp_argv(args) -> list[str]:
    """`iomt edge federate`'s privacy options for the demo's settings."""
    argv = ["--dp", args.dp, "--epsilon", str(args.epsilon)]
    if args.clip_norm is not None:
        argv += ["--clip-norm", str(args.clip_norm)]
    if args.noise_multiplier is not None:
        argv += ["--noise-multiplier", str(args.noise_multiplier)]
    return argv


def _watch_rounds(sup: Supervisor, fed: dict, client, rounds: int, say: Callable[[str], None]) -> None:
    """Print each round's state changes (asking as ``client``, a FederatedClient) until every
    federated client has exited."""
    seen: tuple | None = None
    try:
        while any(c.proc.poll() is None for c in fed.values()):
            sup.check()
            try:
                cur = client.status().current
            except Exception:  # the coordinator may be busy; the next poll will tell
                cur = None
            if cur is not None:
                now = (cur.config.round, cur.state)
                if now != seen:
                    seen = now
                    extra = f" participants {cur.participants}" if getattr(cur, "participants", None) else ""
                    if now[1] == "done" and cur.privacy:
                        extra += "; epsilon spent (as each hospital reports): " + ", ".join(
                            f"{h} {'inf' if p.epsilon is None else f'{p.epsilon:.2f}'}"
                            for h, p in sorted(cur.privacy.items()))
                    say(f"round {now[0]}/{rounds}: {now[1]}{extra}")
            time.sleep(POLL_S)
    finally:
        client.close()
