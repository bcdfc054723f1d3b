"""`iomt demo`: a whole federation on this machine, every role its own process.

1. an MQTT broker (Mosquitto when installed, else the embedded one);
2. per hospital an edge daemon, then a simulator that publishes a cohort through real
   device agents; the demo waits until every edge has stored everything published;
3. the cloud: n non-colluding parties (each with its CrypTen worker), the trusted third
   party that deals Beaver triples, and the coordinator (which never holds a share);
4. R federated rounds: each edge trains locally with patient-level DP-SGD (epsilon 8 at
   delta 1e-5 over all rounds, by default), secret-shares
   its model and uploads one share per party; the parties aggregate on shares;
5. a clinician's encrypted inference for a held-out patient, checked against the
   plaintext prediction the hospital can make with the global model it reconstructed;
6. a report (Markdown, JSON, PNG plots) in the output folder;
7. with ``--serve``, the federation stays up after the report: the first hospital's
   clinician page (`iomt edge web`, with a demo account) and the coordinator's operator
   page (with an operator token) are printed, until Ctrl-C.

Every process is stopped at the end, on error, and on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

from iomt.supervisor import ChildFailed, Supervisor, free_port, iomt_argv, wait_port

log = logging.getLogger(__name__)

MARKER = ".iomt-demo"
HOSPITALS = ("st-mary", "riverside", "northgate", "lakeside", "hillcrest")
POLL_S = 0.5


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    p = sub.add_parser(name, help=help_line, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (report, logs, data)")
    p.add_argument("--hospitals", type=int, default=3, choices=range(1, len(HOSPITALS) + 1), metavar="N")
    p.add_argument("--patients", type=int, default=48, help="patients per hospital")
    p.add_argument("--duration", type=float, default=24.0, help="seconds of wearable signal per patient")
    p.add_argument("--parties", type=int, default=2, help="non-colluding cloud parties (>= 2)")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds")
    p.add_argument("--epochs", type=int, default=10, help="local epochs per round (paper: 10)")
    p.add_argument("--dp", choices=("sgd", "update", "off"), default="sgd",
                   help='"sgd": patient-level DP-SGD at each edge (default); "update": the source paper\'s noise '
                        'on the whole update (needs --clip-norm and --noise-multiplier); "off"')
    p.add_argument("--epsilon", type=float, default=8.0,
                   help="DP-SGD: each hospital's target epsilon at delta 1e-5 for the whole run (default 8)")
    p.add_argument("--clip-norm", type=float, default=None,
                   help="DP: L2 bound C on each patient's gradient (sgd, default 1.0) or on each update (update)")
    p.add_argument("--noise-multiplier", type=float, default=None,
                   help="DP: noise sigma (times C); DP-SGD calibrates it from --epsilon when absent")
    p.add_argument("--fusion", choices=("attention", "quadratic"), default="attention",
                   help="the model's fusion and head: the paper's attention, or the MPC-friendly quadratic one "
                        "(encrypted inference in 12 rounds instead of 92)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="reuse an --out folder that a demo did not make")
    p.add_argument("--serve", action="store_true",
                   help="after the report, leave the federation up and print the clinician's and operator's "
                        "pages (with a demo account) until Ctrl-C")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists() and not force:
            raise SystemExit(f"error: {out} is not empty and was not made by `iomt demo`; "
                             "choose another --out or pass --force")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by iomt demo; deleted by the next demo run into this folder\n")


def _wait_ingested(edges: dict[str, Path], reports: dict[str, dict], sup: Supervisor,
                   timeout: float = 300.0) -> dict[str, dict]:
    """Block until each edge stored as many messages as its simulator published."""
    from edge_server.ingest.sqlite_store import SqliteStore

    want = {h: sum(r["published"].values()) for h, r in reports.items()}
    deadline = time.monotonic() + timeout
    statuses: dict[str, dict] = {}
    while True:
        sup.check()
        for h, d in edges.items():
            with SqliteStore(d, readonly=True) as store:
                statuses[h] = store.status()
        have = {h: s["stored"]["total"] for h, s in statuses.items()}
        if all(have[h] >= want[h] for h in edges):
            return statuses
        if time.monotonic() > deadline:
            raise ChildFailed(f"edges stored {have} of {want} messages within {timeout:.0f}s")
        time.sleep(POLL_S)


def run(args: argparse.Namespace) -> int:
    if args.parties < 2:
        print("error: --parties must be at least 2 (one party alone would see every update)", file=sys.stderr)
        return 2
    out: Path = args.out.resolve()
    _prepare_out(out, args.force)
    hospitals = list(HOSPITALS[: args.hospitals])
    started = time.monotonic()
    sup = Supervisor(out / "logs")
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        report = _run(args, out, hospitals, sup)
        report["wall_s"] = round(time.monotonic() - started, 1)
        from iomt.demo_report import privacy_summary, write_report
        paths = write_report(out, report)
        _say(privacy_summary(report))
        _say(f"done in {report['wall_s']:.0f}s; report: {paths['markdown']}")
        if args.serve:
            _serve(out, hospitals, report, sup)
    except KeyboardInterrupt:
        _say("interrupted: stopping every process")
        return 130
    except ChildFailed as err:
        _say(f"failed: {err}")
        return 1
    finally:
        sup.stop_all()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _serve(out: Path, hospitals: list[str], report: dict, sup: Supervisor) -> None:
    """Start the first hospital's clinician page, print both pages, and wait for Ctrl-C."""
    import secrets

    from edge_server.web import Accounts
    from protocols.auth import Signer

    hospital, cloud = hospitals[0], report["cloud"]
    edge_dir, keys = out / "edge" / hospital, out / "cloud" / "creds" / "keys"
    password = secrets.token_urlsafe(12)
    Accounts(edge_dir).add("demo", password)
    port = free_port()
    hosts = Path(cloud["tls_hosts"])
    web = sup.start(f"web-{hospital}", iomt_argv(
        "edge", "web", "--data-dir", str(edge_dir), "--listen", f"127.0.0.1:{port}",
        "--parties", ",".join(cloud["party_urls"]), "--key-file", str(keys / f"{hospital}.json"),
        "--ca", cloud["ca"], "--cloud-tls-cert", str(hosts / hospital / "tls.pem"),
        "--cloud-tls-key", str(hosts / hospital / "tls.key"), "--cloud-tls-crl", cloud["crl"]))
    wait_port(port, proc=web.proc, name="clinician page")
    token = Signer.from_file(keys / "coordinator.json").token("coordinator", ttl=600.0)
    _say("the federation stays up (--serve); Ctrl-C stops every process")
    print(f"  clinician's page ({hospital}): http://127.0.0.1:{port}/  user: demo  password: {password}", flush=True)
    print(f"  operator's page: {cloud['coordinator']}/operator  token (sign in within 10 min):\n    {token}", flush=True)
    print(f"  a fresh token: iomt cloud operator-token --key-file {keys / 'coordinator.json'}", flush=True)
    p12, p12_password = _operator_certificate(Path(cloud["ca"]).parent, hosts)
    print(f"  the coordinator wants a client certificate (mutual TLS): import {p12} (password "
          f"{p12_password}) into the browser; scripts with the token use the coordinator's own, "
          f"{hosts / 'coordinator'}/tls.pem and tls.key", flush=True)
    print(f"  (the coordinator's TLS certificate is signed by the demo's own CA, {cloud['ca']}: "
          "accept it in the browser or import that CA)", flush=True)
    try:
        while True:
            sup.check()
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        _say("Ctrl-C: stopping every process")


def _operator_certificate(ca_dir: Path, hosts: Path) -> tuple[Path, str]:
    """An ``operator`` certificate from the demo's CA for a browser, as PKCS#12: (file, password)."""
    import secrets

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    from protocols.pki import CertificateAuthority, init_host, install_cert

    ca = CertificateAuthority(ca_dir)
    files = init_host(hosts / "operator", "operator", "operator")
    pem, _ = ca.sign(files.tls_csr.read_bytes(), "operator", "operator")
    install_cert(files.dir, pem, ca.cert_path.read_bytes())
    password = secrets.token_urlsafe(9)
    key = serialization.load_pem_private_key(files.tls_key.read_bytes(), password=None)
    blob = pkcs12.serialize_key_and_certificates(
        b"iomt operator", key, x509.load_pem_x509_certificate(pem), [ca.cert],
        serialization.BestAvailableEncryption(password.encode()))
    out = files.dir / "operator.p12"
    out.write_bytes(blob)
    out.chmod(0o600)
    return out, password


def _run(args: argparse.Namespace, out: Path, hospitals: list[str], sup: Supervisor) -> dict:
    from iomt import demo_cloud

    report: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                 if k != "func"}, "hospitals": hospitals}
    # 1. broker -------------------------------------------------------------------------
    port = free_port()
    # No --data-dir: the demo never restarts its broker, and as root a data directory inside a
    # private (0700) --out would be refused, since Mosquitto runs as its own user.
    # Anonymous on loopback: the simulator's many agents share no accounts (a demo, not a ward).
    broker = sup.start("broker", iomt_argv("broker", "--port", str(port), "--allow-anonymous"))
    wait_port(port, proc=broker.proc, name="broker")
    broker_url = f"mqtt://127.0.0.1:{port}"
    _say(f"broker listening on {broker_url}")

    # 2. edges and simulators -------------------------------------------------------------
    edges = {h: out / "edge" / h for h in hospitals}
    for h, d in edges.items():
        mport = free_port()
        child = sup.start(f"edge-{h}", iomt_argv("edge", "run", "--hospital", h, "--broker", broker_url,
                                                 "--data-dir", str(d), "--metrics-port", str(mport)))
        wait_port(mport, proc=child.proc, name=f"edge {h}")
    _say(f"{len(edges)} edge servers subscribed; simulating {args.patients} patients per hospital")
    sims = {}
    for i, h in enumerate(hospitals):
        sims[h] = sup.start(f"simulate-{h}", iomt_argv(
            "simulate", "--hospital", h, "--index", str(i), "--broker", broker_url,
            "--patients", str(args.patients), "--duration", str(args.duration),
            "--seed", str(args.seed + i), "--report", str(out / "simulate" / f"{h}.json"),
            "--buffer-dir", str(out / "simulate" / f"{h}-buffer")), daemon=False)
    for h, child in sims.items():
        if child.proc.wait() != 0:
            raise ChildFailed(f"simulator for {h} exited with {child.proc.returncode}:\n{sup.tail(child)}")
    reports = {h: json.loads((out / "simulate" / f"{h}.json").read_text()) for h in hospitals}
    statuses = _wait_ingested(edges, reports, sup)
    report["ingest"] = {h: {"published": reports[h]["published"], "stored": statuses[h]["stored"],
                            "rejected": statuses[h]["rejected"]} for h in hospitals}
    _say("every edge stored everything its devices published: " + ", ".join(
        f"{h} {statuses[h]['stored']['total']}" for h in hospitals))

    # 3.-5. the cloud, federated rounds and encrypted inference ------------------------------
    report.update(demo_cloud.run_cloud(args, out, hospitals, edges, sup, _say))
    return report
