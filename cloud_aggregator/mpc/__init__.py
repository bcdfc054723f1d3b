"""The parties' MPC group: what every party computes together on secret shares (CrypTen).

Each party runs one worker process (:mod:`.worker`) that joins the group over a checked
link (:mod:`.mpclink`); party 0 sequences jobs, typed by :mod:`.jobs`, and every party runs
the handler of each job's kind: encrypted inference
(:class:`cloud_aggregator.inference.handler.InferenceHandler`) or the FedAdam/FedYogi server
step (:mod:`.server_opt`). Handlers share :mod:`.functions` (re-randomisation, inverse
square root). A trusted third party (:mod:`.provider`) deals Beaver triples, which a
worker fetches ahead of requests while idle (:mod:`.triples`). The party builds one group
(:class:`WorkerSupervisor`) in ``create_app`` and hands it to the inference router and to
its aggregation.
"""
from cloud_aggregator.mpc.jobs import Job, JobHeader, JobKind, JobStatus, http_status
from cloud_aggregator.mpc.worker import Handler, WorkerConfig, WorkerLoop, WorkerSupervisor

__all__ = ["Handler", "Job", "JobHeader", "JobKind", "JobStatus", "WorkerConfig", "WorkerLoop", "WorkerSupervisor",
           "http_status"]
