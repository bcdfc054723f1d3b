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
[0.01, 200] with >= 8 iterations and diverges above ~200, so :func:`inv_sqrt_wide`
evaluates it on ``x`` and on ``x / 10^4`` and picks one with a secure comparison. Measured
relative error (single-process CrypTen): <= 1.2e-3 for ``K^2 (v + tau^2)`` in [0.01, 1e4],
3e-3 up to 1e5, 1.4% up to 2e6 (the 2^-16 resolution of a result ~1e-3); with the defaults
(K = 256, tau = 1e-3) 2e6 means ``sqrt(v)`` about 5.5 per coordinate. Beyond that the step
is wrong. Public multipliers are 16-bit fixed point too (``1 - b2 = 0.01`` is 5.5e-4 off).

The job runs in each party's MPC worker (:mod:`cloud_aggregator.inference.worker`, kind
``server_update``), sequenced by party 0 like inference requests; each party reads only
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

from cloud_aggregator.store import atomic_write, load_global_share
from protocols.aggregation_messages import RoundConfig, ServerOptConfig
from protocols.params import flatten, normalise_spec

log = logging.getLogger(__name__)

JOB_KIND = "server_update"
#: Newton iterations of CrypTen's inv_sqrt (its default 3 is accurate only near 1).
INV_SQRT_ITERS = 10
#: Above this the rescaled branch of inv_sqrt_wide is used.
SPLIT = 100.0
RESCALE, RESCALE_SQRT = 10_000, 100
#: Seconds the party waits for its MPC worker to finish a server update.
UPDATE_TIMEOUT_S = 600.0
_STATUS = {1: "missing_share", 3: "no_model", 4: "client_mismatch"}


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
        return theta, int(meta["denominator"]), None, None
    with np.load(path) as z:
        return theta, int(meta["denominator"]), z["m"].astype(np.int64), z["v"].astype(np.int64)


def inv_sqrt_wide(x: Any) -> Any:
    """1/sqrt(x) for shared ``x`` in [0.01, 2e6] (two CrypTen inv_sqrt ranges, one comparison)."""
    from cloud_aggregator.crypten_compat import load_crypten

    with load_crypten().cfg.temp_override({"functions.sqrt_nr_iters": INV_SQRT_ITERS}):
        small = x.inv_sqrt()
        # divide by public integers: a multiplier like 1e-4 would itself be rounded to 16 bits (7% off)
        big = x.div(RESCALE).inv_sqrt().div(RESCALE_SQRT)
    use_big = x.gt(SPLIT)  # shares of 0/1; the unused branch (possibly diverged) is multiplied by 0
    return small + (big - small) * use_big


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
        inv = inv_sqrt_wide(v_new + (k * public["tau"]) ** 2)
        theta = prev + (m_new * inv).mul(public["lr"])
        out = {}
        for name, value in (("theta", theta), ("m", m_new), ("v", v_new)):
            # re-randomise before storing: every stored share is fresh, whatever the circuit left
            zero = crypten.mpc.primitives.ArithmeticSharedTensor.PRZS(value.size(), device=device)
            out[name] = (value._tensor.share + zero.share).cpu().numpy().astype(np.int64)
    return out


def run_job(loop: Any, header: dict) -> None:
    """Worker side (inside the MPC child process) of a ``server_update`` job; all parties run it."""
    import torch

    rid, public = header["id"], header["public"]
    loop.current = rid
    job = loop._wait_share(rid) if loop.cfg.rank else loop.inbox.pop(rid, None)
    code, message, state = 0, "", None
    if job is None:
        code, message = 1, f"party {loop.cfg.rank} was not asked for this server update"
    elif job.params.get("public") != public:
        code, message = 4, f"party {loop.cfg.rank} was asked for a different server update"
    else:
        try:
            state = load_state(loop.cfg.data_dir, public, job.params["spec"])
        except (OSError, KeyError, ValueError) as err:
            code, message = 3, f"party {loop.cfg.rank} cannot load global v{public['base_version']}: {err}"
        else:
            if state[0].size != job.inputs["sum"].size:
                code, message = 4, f"party {loop.cfg.rank}: the previous model and the sum differ in size"
    codes = loop.comm.all_gather(torch.tensor([code]))
    bad = [(r, int(c)) for r, c in enumerate(codes) if int(c)]
    if bad:
        loop.results.put(("error", rid, (_STATUS.get(bad[0][1], "bad_input"),
                                         message or f"party {bad[0][0]} refused the server update")))
        loop.current = None
        return
    loop.comm.reset_communication_stats()
    start = time.perf_counter()
    shares = compute(public, job.inputs["sum"], *state, device=loop.cfg.device)
    stats = loop.comm.get_communication_stats()
    info = {"seconds": time.perf_counter() - start, "rounds": int(stats.get("rounds", 0)),
            "bytes": int(stats.get("bytes", 0)), "version": public["version"]}
    loop.results.put(("result", rid, (shares, info)))
    loop.current = None


def update_on_shares(supervisor: Any, data_dir: str | Path, kind: str, cfg: RoundConfig, total: np.ndarray,
                     denominator: int) -> tuple[np.ndarray, dict]:
    """Party side: run the job in the MPC group, store the moments privately, return theta's share."""
    from cloud_aggregator.inference.worker import Job

    public = public_params(kind, cfg, denominator)
    job = Job(request_id=f"{JOB_KIND}-v{cfg.version}", client="coordinator", version=cfg.version,
              inputs={"sum": total}, kind=JOB_KIND, params={"public": public, "spec": cfg.spec})
    shares, info = supervisor.submit(job, timeout=UPDATE_TIMEOUT_S)
    buf = io.BytesIO()
    np.savez(buf, m=shares["m"], v=shares["v"])
    atomic_write(opt_state_path(data_dir, cfg.version), buf.getvalue())
    log.info("server %s step for v%d on shares: %.2fs, %d rounds, %d bytes", kind, cfg.version,
             info["seconds"], info["rounds"], info["bytes"])
    return shares["theta"], {**public, "mpc_seconds": info["seconds"], "mpc_rounds": info["rounds"],
                             "mpc_bytes": info["bytes"]}
