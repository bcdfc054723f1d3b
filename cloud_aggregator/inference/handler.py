"""The MPC group's handler of encrypted-inference jobs (``JobKind.INFER``), run by every party
in its worker process (:mod:`cloud_aggregator.mpc.worker`)."""
from __future__ import annotations

import logging
import time
from typing import Any

from cloud_aggregator.inference.errors import InferenceError
from cloud_aggregator.mpc.functions import rerandomise
from cloud_aggregator.mpc.jobs import Job, JobHeader, JobStatus

log = logging.getLogger(__name__)

MAX_BATCH = 64


class InferenceHandler:
    """Checks a party's share of a query, agrees with the other parties, then evaluates the
    shared global model on it; keeps the last model version it loaded."""

    def __init__(self) -> None:
        self.models: dict[int, tuple[dict, Any]] = {}

    def __call__(self, loop: Any, header: JobHeader) -> None:
        import torch

        rid = header.id
        job = loop.wait_for_share(rid)
        status, message, model = self._check(loop, header, job)
        # with each party's status, the count of prefetched triples: they must be equal
        bad, extras = loop.agree_status(status, loop.prefetch.fingerprint())
        if len({e[0] for e in extras}) > 1:
            log.warning("prefetched triples out of step across parties %s; dropping them", [e[0] for e in extras])
            loop.prefetch.clear()
        if bad:
            loop.fail(rid, bad[0][1], message or f"party {bad[0][0]} refused: {bad[0][1].value}")
            return
        loop.comm.reset_communication_stats()
        start = time.perf_counter()
        device = loop.cfg.device
        mpc = loop.crypten.mpc.MPCTensor
        with loop.crypten.no_grad():
            enc = {name: mpc.from_shares(torch.from_numpy(arr).to(device)) for name, arr in job.inputs.items()}
            signature = (header.version, tuple(sorted((k, tuple(v)) for k, v in header.shapes.items())))
            if hasattr(model, "prepare"):  # once per model, collective, outside the traced request
                try:
                    model.prepare()
                except InferenceError as err:  # e.g. model_out_of_range: every party opened the same bits
                    log.warning("request %s refused: %s: %s", rid, err.reason, err.detail)
                    loop.fail(rid, err.reason, err.detail)
                    return
            if getattr(model, "prefetch_triples", False):  # small circuits only: the cache holds a request's worth
                out = loop.prefetch.run(signature, lambda: model.forward(enc))
            else:
                out = model.forward(enc)
            shares = {name: rerandomise(value, device) for name, value in out.items()}
        stats = loop.comm.get_communication_stats()
        info = {"version": header.version, "seconds": time.perf_counter() - start,
                "rounds": int(stats.get("rounds", 0)), "bytes": int(stats.get("bytes", 0))}
        loop.succeed(rid, shares, info)
        # offline phase for the next request of this shape (both parties, same order)
        with loop.crypten.no_grad():
            loop.prefetch.refill(signature)

    def _check(self, loop: Any, header: JobHeader, job: Job | None) -> tuple[JobStatus, str, Any]:
        rank = loop.cfg.rank
        if job is None:
            return JobStatus.MISSING_SHARE, f"party {rank} received no share for this request", None
        if job.client != header.client:
            return JobStatus.CLIENT_MISMATCH, f"party {rank} holds this request id from another client", None
        if {k: list(v.shape) for k, v in job.inputs.items()} != header.shapes:
            return JobStatus.BAD_SHAPE, f"party {rank} holds shares of other shapes", None
        try:
            model = self._model(loop.cfg, header.version)
        except (OSError, KeyError, ValueError, InferenceError) as err:
            return JobStatus.NO_MODEL, f"party {rank} cannot load model version {header.version}: {err}", None
        names = {spec.name: spec.shape for spec in model.inputs}
        if set(job.inputs) != set(names):
            return JobStatus.BAD_INPUT, f"inputs must be {sorted(names)}, got {sorted(job.inputs)}", None
        batches = {arr.shape[0] if arr.ndim else -1 for arr in job.inputs.values()}
        for name, arr in job.inputs.items():
            if tuple(arr.shape[1:]) != tuple(names[name]) or len(batches) != 1:
                return (JobStatus.BAD_SHAPE,
                        f"input {name!r} must be (batch, {', '.join(map(str, names[name]))}), got {arr.shape}", None)
        if not 1 <= batches.pop() <= MAX_BATCH:
            return JobStatus.BAD_SHAPE, f"batch size must be 1..{MAX_BATCH}", None
        return JobStatus.OK, "", model

    def _model(self, cfg: Any, version: int | None) -> Any:
        if version is None:
            raise InferenceError("no_model", "no global model has been published")
        if version not in self.models:
            from cloud_aggregator.inference.models import load_encrypted_model
            from cloud_aggregator.store import load_global_share

            meta, arrays = load_global_share(cfg.data_dir, version)
            self.models = {version: (meta, load_encrypted_model(meta, arrays, cfg.device))}
            log.info("loaded shared model version %d (%s)", version, meta.model.arch)
        return self.models[version][1]
