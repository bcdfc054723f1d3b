"""FedAdam and FedYogi run by the parties on secret shares, inside their CrypTen group.

Reddi et al. 2021 ("Adaptive Federated Optimization", Alg. 2) with the global model
``theta`` and both moments ``m, v`` secret-shared across the parties at all times:

    avg   = S / N                               (S: the summed uploads, N public)
    delta = avg - theta_prev                    (pseudo-gradient)
    m     = b1 m + (1 - b1) delta
    v     = b2 v + (1 - b2) delta^2             (Adam; Beaver multiplication)
    v     = v - (1 - b2) delta^2 sign(v - delta^2)   (Yogi; one secure comparison)
    theta = theta_prev + lr m / sqrt(v + tau^2)

Differences from the paper, all public and documented: the denominator is
``sqrt(v + tau^2)`` rather than ``sqrt(v) + tau`` (one CrypTen ``inv_sqrt`` instead of
sqrt then reciprocal, whose ranges are narrower; the two agree within a factor sqrt(2) at
v = tau^2 and converge for v >> tau^2); there is no bias correction (as in the paper);
the first FedAdam round has no previous global model at the parties (clients start from
a public seed the cloud does not build), so round 1 publishes ``S / N`` (a FedAvg warm
start) and the optimiser runs from round 2, with ``m = v = 0`` before its first step.

Fixed point: CrypTen's 16 fractional bits would round ``(1 - b2) delta^2`` to zero for
typical ``|delta| ~ 1e-3``, so the parties keep ``K m`` and ``K^2 v`` with a public scale
``K`` (``ServerOptConfig.scale``, 256 by default); ``K m / sqrt(K^2 (v + tau^2))`` is the same
step. CrypTen's ``inv_sqrt`` (Newton from an exp-based guess) is within 1e-3 relative on
[0.01, 200] with >= 8 iterations and diverges above ~200, so the step uses
:func:`cloud_aggregator.mpc.functions.inv_sqrt` with ``wide=True``, which evaluates it on
``x`` and on ``x / 10^4`` and picks one with a secure comparison. Measured
relative error (single-process CrypTen): <= 1.2e-3 for ``K^2 (v + tau^2)`` in [0.01, 1e4],
3e-3 up to 1e5, 1.4% up to 2e6 (the 2^-16 resolution of a result ~1e-3); with the defaults
(K = 256, tau = 1e-3) 2e6 means ``sqrt(v)`` about 5.5 per coordinate. Beyond that the step
is wrong. Public multipliers are 16-bit fixed point too (``1 - b2 = 0.01`` is 5.5e-4 off).

The job runs in each party's MPC worker (:mod:`cloud_aggregator.mpc.worker`, handler
:func:`run_server_update` of ``JobKind.SERVER_UPDATE``), sequenced by party 0 like inference requests; each party reads only
its own shares and returns its share of the new ``theta``, ``K m`` and ``K^2 v``. The party
stores the moments privately in ``D/server_opt/v{version:06d}.npz`` (never served) and
publishes ``theta`` as the global version with denominator 1.
"""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud_aggregator.mpc.functions import inv_sqrt, rerandomise
from cloud_aggregator.mpc.jobs import Job, JobHeader, JobKind, JobStatus
from cloud_aggregator.store import atomic_write, load_global_share
from protocols.aggregation_messages import RoundConfig, ServerOptConfig
from protocols.params import flatten, normalise_spec

log = logging.getLogger(__name__)

#: Newton iterations of CrypTen's inv_sqrt (its default 3 is accurate only near 1).
INV_SQRT_ITERS = 10
#: Seconds the party waits for its MPC worker to finish a server update.
UPDATE_TIMEOUT_S = 600.0


def opt_state_path(data_dir: str | Path, version: int) -> Path:
    """Where a party keeps its shares of ``K m`` and ``K^2 v`` after producing ``version``."""
    return Path(data_dir) / "server_opt" / f"v{version:06d}.npz"


def public_params(kind: str, cfg: RoundConfig, denominator: int) -> dict:
    """What every party must agree on before computing (checked inside the MPC job)."""
    opt = cfg.server_opt or ServerOptConfig()
    return {"opt": kind, "round": cfg.round, "version": cfg.version, "base_version": cfg.base_version,
            "denominator": int(denominator), "spec_hash": cfg.spec_hash, **opt.model_dump()}


def load_state(data_dir: str | Path, public: dict, spec: list) -> tuple[np.ndarray, int, np.ndarray | None,
                                                                         np.ndarray | None]:
    """This party's shares of theta_prev (with its denominator) and of K m, K^2 v (None before step 1)."""
    meta, arrays = load_global_share(data_dir, public["base_version"])
    theta = flatten(arrays, normalise_spec(spec), dtype=np.int64)
    path = opt_state_path(data_dir, public["base_version"])
    if not path.exists():
        return theta, meta.denominator, None, None
    with np.load(path) as z:
        return theta, meta.denominator, z["m"].astype(np.int64), z["v"].astype(np.int64)


def compute(public: dict, total: np.ndarray, theta_prev: np.ndarray, den_prev: int,
            m: np.ndarray | None, v: np.ndarray | None, device: str = "cpu") -> dict[str, np.ndarray]:
    """One optimiser step on shares; returns this party's int64 shares of theta, K m, K^2 v."""
    import torch

    from cloud_aggregator.crypten_compat import load_crypten

    crypten = load_crypten()
    mpc = crypten.mpc.MPCTensor

    def enc(arr: np.ndarray) -> Any:
        return mpc.from_shares(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)).to(device))

    b1, b2, k = public["beta1"], public["beta2"], int(public["scale"])
    with crypten.no_grad():
        avg = enc(total).div(public["denominator"])
        prev = enc(theta_prev)
        if den_prev != 1:
            prev = prev.div(den_prev)
        delta = (avg - prev).mul(k)  # K * delta: exact (public integer)
        m_new = delta.mul(1 - b1) if m is None else enc(m).mul(b1) + delta.mul(1 - b1)
        d2 = delta.square()
        if v is None:  # v = 0 before the first step: Adam and Yogi agree
            v_new = d2.mul(1 - b2)
        elif public["opt"] == "adam":
            v_new = enc(v).mul(b2) + d2.mul(1 - b2)
        else:
            v_old = enc(v)
            v_new = v_old - (d2 * (v_old - d2).sign()).mul(1 - b2)
        inv = inv_sqrt(v_new + (k * public["tau"]) ** 2, INV_SQRT_ITERS, method="newton", wide=True)
        theta = prev + (m_new * inv).mul(public["lr"])
        return {name: rerandomise(value, device) for name, value in (("theta", theta), ("m", m_new), ("v", v_new))}


def run_server_update(loop: Any, header: JobHeader) -> None:
    """Handler of ``JobKind.SERVER_UPDATE`` jobs (inside the MPC worker process); all parties run it."""
    rid, public = header.id, header.public
    job = loop.wait_for_share(rid)
    rank = loop.cfg.rank
    status, message, state = JobStatus.OK, "", None
    if job is None:
        status, message = JobStatus.MISSING_SHARE, f"party {rank} was not asked for this server update"
    elif job.params.get("public") != public:
        status, message = JobStatus.CLIENT_MISMATCH, f"party {rank} was asked for a different server update"
    else:
        try:
            state = load_state(loop.cfg.data_dir, public, job.params["spec"])
        except (OSError, KeyError, ValueError) as err:
            status, message = JobStatus.NO_MODEL, f"party {rank} cannot load global v{public['base_version']}: {err}"
        else:
            if state[0].size != job.inputs["sum"].size:
                status, message = (JobStatus.CLIENT_MISMATCH,
                                   f"party {rank}: the previous model and the sum differ in size")
    bad, _ = loop.agree_status(status)
    if bad:
        loop.fail(rid, bad[0][1], message or f"party {bad[0][0]} refused the server update")
        return
    loop.comm.reset_communication_stats()
    start = time.perf_counter()
    shares = compute(public, job.inputs["sum"], *state, device=loop.cfg.device)
    stats = loop.comm.get_communication_stats()
    info = {"seconds": time.perf_counter() - start, "rounds": int(stats.get("rounds", 0)),
            "bytes": int(stats.get("bytes", 0)), "version": public["version"]}
    loop.succeed(rid, shares, info)


def update_on_shares(group: Any, data_dir: str | Path, kind: str, cfg: RoundConfig, total: np.ndarray,
                     denominator: int) -> tuple[np.ndarray, dict]:
    """Party side: run the job in the MPC ``group`` (its ``WorkerSupervisor``), store the moments
    privately, return theta's share."""
    public = public_params(kind, cfg, denominator)
    job = Job(request_id=f"{JobKind.SERVER_UPDATE.value}-v{cfg.version}", client="coordinator", version=cfg.version,
              inputs={"sum": total}, kind=JobKind.SERVER_UPDATE, params={"public": public, "spec": cfg.spec})
    shares, info = group.submit(job, timeout=UPDATE_TIMEOUT_S)
    buf = io.BytesIO()
    np.savez(buf, m=shares["m"], v=shares["v"])
    atomic_write(opt_state_path(data_dir, cfg.version), buf.getvalue())
    log.info("server %s step for v%d on shares: %.2fs, %d rounds, %d bytes", kind, cfg.version,
             info["seconds"], info["rounds"], info["bytes"])
    return shares["theta"], {**public, "mpc_seconds": info["seconds"], "mpc_rounds": info["rounds"],
                             "mpc_bytes": info["bytes"]}
