"""The party-side CrypTen worker: one child process per party that owns all CrypTen state.

CrypTen keeps its communicator in process-global state and torch.distributed allows one
default group per process, so each party's MPC runs in a dedicated child process beside
its FastAPI server (:class:`WorkerSupervisor`), and a broken group is healed by replacing
the process rather than repairing it.

Order of work: party 0 is the sequencer. Its worker takes requests in arrival order and
broadcasts a header (request id, client, model version, input shapes) to every party, or
a ``noop`` heartbeat when idle. Every party then looks for its own share of that request
(waiting up to ``SHARE_WAIT_S``), all parties exchange a status code, and they compute
only if every party holds a well-formed share; otherwise all report the same error. So
parties process the same requests in the same order whatever order shares arrive in.
"""
from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.inference.mpclink import MpcLink, bind_distributed
from cloud_aggregator.inference.triples import TriplePrefetcher

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
SHARE_WAIT_S = 10.0
INBOX_TTL_S = 60.0
#: torch.distributed timeout: long, since dead peers are detected by closed connections
#: and stalled groups by the supervisor (REQUEST_TIMEOUT_S), not by idle collectives.
DIST_TIMEOUT_S = 7 * 24 * 3600.0
#: How long a request may compute before it is failed and the group restarted; large
#: batches of big models on CPUs need more (environment IOMT_MPC_REQUEST_TIMEOUT, seconds).
REQUEST_TIMEOUT_S = float(os.environ.get("IOMT_MPC_REQUEST_TIMEOUT", "120"))
RESTART_BACKOFF_S = 1.0
MAX_BATCH = 64
_STATUS = ("ok", "missing_share", "bad_shape", "no_model", "client_mismatch", "bad_input")


@dataclass(frozen=True)
class WorkerConfig:
    """What a party's worker process needs (picklable: it crosses into a spawned process)."""

    rank: int
    world_size: int
    master: str  # host:port of the rendezvous (party 0 hosts it)
    data_dir: str
    provider: str = "TTP"  # "TTP" (production: a separate triples process) or "TFP" (dev)
    device: str = "cpu"
    threads: int = 1
    #: fetch the next request's Beaver triples from the TTP while idle (inference.triples)
    prefetch_triples: bool = True
    #: checked MPC address and interface (inference.mpclink.resolve_link); None: torch's defaults
    link: MpcLink | None = None


@dataclass
class Job:
    request_id: str
    client: str
    version: int | None
    inputs: dict[str, np.ndarray]
    received: float = field(default_factory=time.monotonic)
    #: "infer", or "server_update" (cloud_aggregator.server_opt: FedAdam/FedYogi on shares)
    kind: str = "infer"
    params: dict = field(default_factory=dict)


def configure_distributed(cfg_rank: int, world_size: int, master: str, provider: str,
                          link: MpcLink | None = None) -> Any:
    """Environment, timeout and provider for CrypTen's DistributedCommunicator; returns crypten.

    With ``link``, gloo and the rendezvous listen on the link's address only (mpclink)."""
    import torch.distributed as dist

    from cloud_aggregator.crypten_compat import load_crypten

    host, _, port = master.rpartition(":")
    os.environ.update({
        "RANK": str(cfg_rank), "WORLD_SIZE": str(world_size), "DISTRIBUTED_BACKEND": "gloo",
        "RENDEZVOUS": f"tcp://{host or '127.0.0.1'}:{port}", "MASTER_ADDR": host or "127.0.0.1",
        "MASTER_PORT": port,
    })
    if link is not None:
        bind_distributed(link)
    if not getattr(dist.init_process_group, "_iomt_timeout", False):
        original = dist.init_process_group

        def init_with_timeout(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", dt.timedelta(seconds=DIST_TIMEOUT_S))
            return original(*args, **kwargs)

        init_with_timeout._iomt_timeout = True
        dist.init_process_group = init_with_timeout
    crypten = load_crypten()
    crypten.cfg.mpc.provider = provider
    crypten.cfg.communicator.verbose = True  # count rounds and bytes per request
    return crypten


def run_worker(cfg: WorkerConfig, jobs: Any, results: Any) -> None:
    """Child-process entry point: join the MPC group, then serve jobs until told to stop."""
    import torch

    torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s party{cfg.rank}-mpc %(levelname)s %(message)s")
    crypten = configure_distributed(cfg.rank, cfg.world_size, cfg.master, cfg.provider, cfg.link)
    crypten.init()
    results.put(("ready", None, None))
    loop = _WorkerLoop(cfg, jobs, results, crypten)
    try:
        loop.serve()
    except Exception as err:  # the group is broken: report and let the supervisor replace us
        log.warning("MPC group failed: %s", err)
        if loop.current is not None:
            results.put(("error", loop.current, ("party_unreachable", f"MPC group failed: {err}")))
        results.put(("dead", None, str(err)))
        os._exit(3)
    try:
        crypten.uninit()
    except Exception:  # noqa: BLE001 - peers may already be gone at shutdown
        pass


class _WorkerLoop:
    def __init__(self, cfg: WorkerConfig, jobs: Any, results: Any, crypten: Any) -> None:
        from crypten import communicator

        self.cfg, self.jobs, self.results, self.crypten = cfg, jobs, results, crypten
        self.comm = communicator.get()
        self.inbox: dict[str, Job] = {}
        self.models: dict[int, tuple[dict, Any]] = {}
        self.current: str | None = None
        self.stopping = False
        self.prefetch = TriplePrefetcher(crypten, enabled=cfg.prefetch_triples)

    def _drain(self, block_s: float = 0.0) -> Job | None:
        """Move queued jobs into the inbox, waiting up to ``block_s`` for the first one; on
        party 0 return the next one in arrival order."""
        deadline = time.monotonic() + block_s
        while True:
            wait = deadline - time.monotonic()
            try:
                item = self.jobs.get(timeout=wait) if wait > 0 else self.jobs.get_nowait()
            except queue.Empty:
                return None
            if item is None:
                self.stopping = True
                return None
            self.inbox[item.request_id] = item
            if self.cfg.rank == 0:
                return item
            deadline = 0.0  # one arrived: take whatever else is queued, without waiting for more

    def _expire(self) -> None:
        now = time.monotonic()
        for rid, job in list(self.inbox.items()):
            if now - job.received > INBOX_TTL_S:
                del self.inbox[rid]
                self.results.put(("error", rid, ("not_scheduled", "party 0 never scheduled this request")))

    def serve(self) -> None:
        while True:
            if self.cfg.rank == 0:
                job = self._drain(HEARTBEAT_S)
                if self.stopping:
                    header = {"kind": "stop"}
                elif job is None:
                    header = {"kind": "noop"}
                elif job.kind != "infer":
                    header = {"kind": job.kind, "id": job.request_id, "client": job.client,
                              "public": job.params.get("public")}
                else:
                    header = {"kind": "infer", "id": job.request_id, "client": job.client,
                              "version": job.version if job.version is not None else _latest(self.cfg.data_dir),
                              "shapes": {k: list(v.shape) for k, v in job.inputs.items()}}
            else:
                header = None
            header = self.comm.broadcast_obj(header, 0)
            if header["kind"] == "stop":
                return
            if header["kind"] == "infer":
                self._infer(header)
            elif header["kind"] == "server_update":
                from cloud_aggregator.server_opt import run_job
                run_job(self, header)
            if self.cfg.rank:  # party 0 takes its jobs one at a time, in arrival order
                self._drain()
                self._expire()

    def _wait_share(self, rid: str) -> Job | None:
        deadline = time.monotonic() + SHARE_WAIT_S
        while rid not in self.inbox and time.monotonic() < deadline:
            self._drain(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.inbox.pop(rid, None)

    def _check(self, header: dict, job: Job | None) -> tuple[int, str, Any]:
        if job is None:
            return 1, f"party {self.cfg.rank} received no share for this request", None
        if job.client != header["client"]:
            return 4, f"party {self.cfg.rank} holds this request id from another client", None
        if {k: list(v.shape) for k, v in job.inputs.items()} != header["shapes"]:
            return 2, f"party {self.cfg.rank} holds shares of other shapes", None
        try:
            model = self._model(header["version"])
        except (OSError, KeyError, ValueError, InferenceError) as err:
            return 3, f"party {self.cfg.rank} cannot load model version {header['version']}: {err}", None
        names = {spec.name: spec.shape for spec in model.inputs}
        if set(job.inputs) != set(names):
            return 5, f"inputs must be {sorted(names)}, got {sorted(job.inputs)}", None
        batches = {arr.shape[0] if arr.ndim else -1 for arr in job.inputs.values()}
        for name, arr in job.inputs.items():
            if tuple(arr.shape[1:]) != tuple(names[name]) or len(batches) != 1:
                return 2, f"input {name!r} must be (batch, {', '.join(map(str, names[name]))}), got {arr.shape}", None
        if not 1 <= batches.pop() <= MAX_BATCH:
            return 2, f"batch size must be 1..{MAX_BATCH}", None
        return 0, "", model

    def _infer(self, header: dict) -> None:
        import torch

        rid = header["id"]
        self.current = rid
        job = self._wait_share(rid) if self.cfg.rank else self.inbox.pop(rid, None)
        code, message, model = self._check(header, job)
        # with each party's status, the count of prefetched triples: they must be equal
        codes = self.comm.all_gather(torch.tensor([code, self.prefetch.fingerprint()]))
        if len({int(c[1]) for c in codes}) > 1:
            log.warning("prefetched triples out of step across parties %s; dropping them", [int(c[1]) for c in codes])
            self.prefetch.clear()
        bad = [(r, int(c[0])) for r, c in enumerate(codes) if int(c[0])]
        if bad:
            own = message or f"party {bad[0][0]} refused: {_STATUS[bad[0][1]]}"
            self.results.put(("error", rid, (_STATUS[bad[0][1]], own)))
            self.current = None
            return
        self.comm.reset_communication_stats()
        start = time.perf_counter()
        mpc = self.crypten.mpc.MPCTensor
        with self.crypten.no_grad():
            enc = {name: mpc.from_shares(torch.from_numpy(arr).to(self.cfg.device)) for name, arr in job.inputs.items()}
            signature = (header["version"], tuple(sorted((k, tuple(v)) for k, v in header["shapes"].items())))
            if hasattr(model, "prepare"):  # once per model, collective, outside the traced request
                try:
                    model.prepare()
                except InferenceError as err:  # e.g. model_out_of_range: every party opened the same bits
                    log.warning("request %s refused: %s: %s", rid, err.code, err.message)
                    self.results.put(("error", rid, (err.code, err.message)))
                    self.current = None
                    return
            if getattr(model, "prefetch_triples", False):  # small circuits only: the cache holds a request's worth
                out = self.prefetch.run(signature, lambda: model.forward(enc))
            else:
                out = model.forward(enc)
            shares = {}
            for name, value in out.items():
                # re-randomise before release: the output share is fresh, whatever the circuit left
                zero = self.crypten.mpc.primitives.ArithmeticSharedTensor.PRZS(value.size(), device=self.cfg.device)
                shares[name] = (value._tensor.share + zero.share).cpu().numpy().astype(np.int64)
        stats = self.comm.get_communication_stats()
        info = {"version": header["version"], "seconds": time.perf_counter() - start,
                "rounds": int(stats.get("rounds", 0)), "bytes": int(stats.get("bytes", 0))}
        self.results.put(("result", rid, (shares, info)))
        self.current = None
        # offline phase for the next request of this shape (both parties, same order)
        with self.crypten.no_grad():
            self.prefetch.refill(signature)

    def _model(self, version: int | None) -> Any:
        if version is None:
            raise InferenceError("no_model", "no global model has been published")
        if version not in self.models:
            from cloud_aggregator.inference.models import load_encrypted_model
            from cloud_aggregator.store import load_global_share

            meta, arrays = load_global_share(self.cfg.data_dir, version)
            self.models = {version: (meta, load_encrypted_model(meta, arrays, self.cfg.device))}
            log.info("loaded shared model version %d (%s)", version, meta.get("model", {}).get("arch"))
        return self.models[version][1]


def _latest(data_dir: str) -> int | None:
    from cloud_aggregator.store import latest_version

    return latest_version(data_dir)


class WorkerSupervisor:
    """Runs a party's CrypTen worker process, routes results, and restarts it when it dies."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[threading.Event, list]] = {}
        self._proc: Any = None
        self._jobs: Any = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self.restarts = 0
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> WorkerSupervisor:
        # idempotent: FastAPI may run a router's startup handlers twice (event + lifespan)
        with self._lock:
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._run, name=f"mpc-supervisor-{self.cfg.rank}", daemon=True)
            self._thread.start()
        return self

    def _spawn(self) -> Any:
        self._jobs, results = self._ctx.Queue(), self._ctx.Queue()
        proc = self._ctx.Process(target=run_worker, args=(self.cfg, self._jobs, results),
                                 name=f"iomt-mpc-party{self.cfg.rank}", daemon=True)
        proc.start()
        return proc, results

    def _run(self) -> None:
        while not self._stop.is_set():
            self._proc, results = self._spawn()
            log.info("party %d: MPC worker pid %d started", self.cfg.rank, self._proc.pid)
            while not self._stop.is_set():
                try:
                    kind, rid, payload = results.get(timeout=0.2)
                except queue.Empty:
                    if not self._proc.is_alive():
                        break
                    self._reap_stalled()
                    continue
                if kind == "ready":
                    self._ready.set()
                elif kind == "dead":
                    break
                else:
                    self._resolve(rid, kind, payload)
            self._ready.clear()
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
            self._fail_all("party_unreachable", "the MPC group failed during the request; it is restarting")
            if not self._stop.is_set():
                self.restarts += 1
                log.warning("party %d: MPC worker exited (code %s); restart %d", self.cfg.rank,
                            self._proc.exitcode, self.restarts)
                self._stop.wait(RESTART_BACKOFF_S)

    def _reap_stalled(self) -> None:
        now = time.monotonic()
        with self._lock:
            stalled = [rid for rid, (_, box) in self._pending.items() if now - box[1] > REQUEST_TIMEOUT_S]
        if stalled:
            log.warning("party %d: request %s stalled; replacing the MPC worker", self.cfg.rank, stalled[0])
            self._proc.kill()

    def _resolve(self, rid: str, kind: str, payload: Any) -> None:
        with self._lock:
            entry = self._pending.pop(rid, None)
        if entry is not None:
            entry[1][0] = (kind, payload)
            entry[0].set()

    def _fail_all(self, code: str, message: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for event, box in pending.values():
            box[0] = ("error", (code, message))
            event.set()

    def submit(self, job: Job, timeout: float = REQUEST_TIMEOUT_S) -> tuple[dict[str, np.ndarray], dict]:
        """Hand a share to the worker and wait for this party's output shares."""
        if not self.ready:
            raise InferenceError("mpc_unavailable", "the MPC group is not ready (parties still connecting)")
        event, box = threading.Event(), [None, time.monotonic()]
        with self._lock:
            if job.request_id in self._pending:
                raise InferenceError("duplicate_request", f"request {job.request_id} is already in progress")
            self._pending[job.request_id] = (event, box)
        self._jobs.put(job)
        if not event.wait(timeout):
            with self._lock:
                self._pending.pop(job.request_id, None)
            raise InferenceError("timeout", f"no result within {timeout:.0f} s")
        kind, payload = box[0]
        if kind == "error":
            raise InferenceError(*payload)
        return payload

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._jobs is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._jobs.put(None)
            except (OSError, ValueError):
                pass
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout)

