"""The party's MPC group: one CrypTen child process per party that owns all CrypTen state.

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

What a job computes is its kind's handler (``handler(loop, header)``, run by every party in
the worker process): :class:`cloud_aggregator.inference.handler.InferenceHandler` and
:func:`cloud_aggregator.mpc.server_opt.run_server_update`. The party passes them to
:class:`WorkerSupervisor`; handlers use the loop's public helpers (:meth:`WorkerLoop.wait_for_share`,
:meth:`WorkerLoop.agree_status`, :meth:`WorkerLoop.succeed`, :meth:`WorkerLoop.fail`).
"""
from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.mpc.jobs import Job, JobHeader, JobKind, JobStatus
from cloud_aggregator.mpc.mpclink import MpcLink, bind_distributed
from cloud_aggregator.mpc.triples import TriplePrefetcher

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
SHARE_WAIT_S = 10.0
INBOX_TTL_S = 60.0
#: torch.distributed timeout: long, since dead peers are detected by closed connections
#: and stalled groups by the supervisor (REQUEST_TIMEOUT_S), not by idle collectives.
DIST_TIMEOUT_S = 7 * 24 * 3600.0
#: Default of ``WorkerConfig.request_timeout`` (PartySettings.mpc_request_timeout).
REQUEST_TIMEOUT_S = 120.0
RESTART_BACKOFF_S = 1.0

#: What runs a job of one kind, in every party's worker process (picklable: module-level).
Handler = Callable[["WorkerLoop", JobHeader], None]


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
    #: fetch the next request's Beaver triples from the TTP while idle (mpc.triples)
    prefetch_triples: bool = True
    #: checked MPC address and interface (mpc.mpclink.resolve_link); None: torch's defaults
    link: MpcLink | None = None
    #: how long a request may compute before it is failed and the group restarted; large
    #: batches of big models on CPUs need more (seconds)
    request_timeout: float = REQUEST_TIMEOUT_S


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


def run_worker(cfg: WorkerConfig, handlers: Mapping[JobKind, Handler], jobs: Any, results: Any) -> None:
    """Child-process entry point: join the MPC group, then serve jobs until told to stop."""
    import torch

    torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s party{cfg.rank}-mpc %(levelname)s %(message)s")
    crypten = configure_distributed(cfg.rank, cfg.world_size, cfg.master, cfg.provider, cfg.link)
    crypten.init()
    results.put(("ready", None, None))
    loop = WorkerLoop(cfg, jobs, results, crypten, handlers)
    try:
        loop.serve()
    except Exception as err:  # the group is broken: report and let the supervisor replace us
        log.warning("MPC group failed: %s", err)
        if loop.current is not None:
            results.put(("error", loop.current, (JobStatus.PARTY_UNREACHABLE.value, f"MPC group failed: {err}")))
        results.put(("dead", None, str(err)))
        os._exit(3)
    try:
        crypten.uninit()
    except Exception:  # noqa: BLE001 - peers may already be gone at shutdown
        pass


class WorkerLoop:
    """One party's side of the group inside the worker process: takes shares off the queue,
    follows party 0's headers and runs each job's handler; handlers use its public helpers."""

    def __init__(self, cfg: WorkerConfig, jobs: Any, results: Any, crypten: Any,
                 handlers: Mapping[JobKind, Handler]) -> None:
        from crypten import communicator

        self.cfg, self.jobs, self.results, self.crypten = cfg, jobs, results, crypten
        self.handlers = dict(handlers)
        self.comm = communicator.get()
        self.inbox: dict[str, Job] = {}
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
                self.fail(rid, JobStatus.NOT_SCHEDULED, "party 0 never scheduled this request")

    def serve(self) -> None:
        while True:
            if self.cfg.rank == 0:
                job = self._drain(HEARTBEAT_S)
                if self.stopping:
                    header = JobHeader(JobKind.STOP)
                elif job is None:
                    header = JobHeader(JobKind.NOOP)
                else:
                    header = JobHeader.for_job(job, lambda: _latest(self.cfg.data_dir))
            else:
                header = None
            header = JobHeader.from_wire(self.comm.broadcast_obj(header.to_wire() if header else None, 0))
            if header.kind == JobKind.STOP:
                return
            handler = self.handlers.get(header.kind)
            if handler is not None:
                handler(self, header)
            if self.cfg.rank:  # party 0 takes its jobs one at a time, in arrival order
                self._drain()
                self._expire()

    def wait_for_share(self, rid: str) -> Job | None:
        """This party's share of job ``rid`` (None if it never came), which becomes the current job.

        Party 0 announced it, so holds it; the others wait up to ``SHARE_WAIT_S`` for it."""
        self.current = rid
        if self.cfg.rank == 0:
            return self.inbox.pop(rid, None)
        deadline = time.monotonic() + SHARE_WAIT_S
        while rid not in self.inbox and time.monotonic() < deadline:
            self._drain(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.inbox.pop(rid, None)

    def agree_status(self, status: JobStatus, *extra: int) -> tuple[list[tuple[int, JobStatus]], list[list[int]]]:
        """Exchange every party's status (and ``extra`` integers) before computing (collective).

        Returns the parties that refused, as ``(rank, status)`` in rank order, and each party's extras."""
        import torch

        rows = self.comm.all_gather(torch.tensor([status.wire, *extra]))
        bad = [(rank, JobStatus.from_wire(int(row[0]))) for rank, row in enumerate(rows) if int(row[0])]
        return bad, [[int(x) for x in row[1:]] for row in rows]

    def fail(self, rid: str, reason: str, message: str) -> None:
        """Report job ``rid`` as refused (``reason``: a :class:`JobStatus` value or a model's code)."""
        self.results.put(("error", rid, (reason.value if isinstance(reason, JobStatus) else reason, message)))
        self.current = None

    def succeed(self, rid: str, shares: dict[str, np.ndarray], info: dict) -> None:
        """Report this party's output shares of job ``rid``."""
        self.results.put(("result", rid, (shares, info)))
        self.current = None


def _latest(data_dir: str) -> int | None:
    from cloud_aggregator.store import latest_version

    return latest_version(data_dir)


class WorkerSupervisor:
    """Runs a party's CrypTen worker process, routes results, and restarts it when it dies."""

    def __init__(self, cfg: WorkerConfig, handlers: Mapping[JobKind, Handler]) -> None:
        self.cfg = cfg
        self.handlers = dict(handlers)
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
        proc = self._ctx.Process(target=run_worker, args=(self.cfg, self.handlers, self._jobs, results),
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
                    log.info("party %d: MPC worker joined the group of %d parties", self.cfg.rank,
                             self.cfg.world_size)
                elif kind == "dead":
                    break
                else:
                    self._resolve(rid, kind, payload)
            self._ready.clear()
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
            self._fail_all(JobStatus.PARTY_UNREACHABLE.value, "the MPC group failed during the request; it is restarting")
            if not self._stop.is_set():
                self.restarts += 1
                log.warning("party %d: MPC worker exited (code %s); restart %d", self.cfg.rank,
                            self._proc.exitcode, self.restarts)
                self._stop.wait(RESTART_BACKOFF_S)

    def _reap_stalled(self) -> None:
        now = time.monotonic()
        with self._lock:
            stalled = [rid for rid, (_, box) in self._pending.items() if now - box[1] > self.cfg.request_timeout]
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

    def submit(self, job: Job, timeout: float | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """Hand a share to the worker and wait for this party's output shares (``timeout``:
        default ``cfg.request_timeout``)."""
        timeout = self.cfg.request_timeout if timeout is None else timeout
        if job.kind not in self.handlers:
            raise InferenceError(JobStatus.BAD_INPUT.value, f"this MPC group runs no {job.kind.value} jobs")
        if not self.ready:
            raise InferenceError(JobStatus.MPC_UNAVAILABLE.value, "the MPC group is not ready (parties still connecting)")
        event, box = threading.Event(), [None, time.monotonic()]
        with self._lock:
            if job.request_id in self._pending:
                raise InferenceError(JobStatus.DUPLICATE_REQUEST.value, f"request {job.request_id} is already in progress")
            self._pending[job.request_id] = (event, box)
        self._jobs.put(job)
        if not event.wait(timeout):
            with self._lock:
                self._pending.pop(job.request_id, None)
            raise InferenceError(JobStatus.TIMEOUT.value, f"no result within {timeout:.0f} s")
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

