"""Encrypted inference (CrypTen) from the secret-shared global model.

Each party's MPC group (:mod:`cloud_aggregator.mpc`) runs this package's job handler
(:mod:`.handler`), which loads its share of the global model straight into
``MPCTensor.from_shares`` (:mod:`.models`); a trusted third party
(:mod:`cloud_aggregator.mpc.provider`) deals Beaver triples; clinicians send secret-shared queries
through each party's FastAPI router (:mod:`.router`) and reconstruct the answer locally
(:mod:`.client`). No party ever sees the query, the answer or the model in the clear.
:mod:`.ranges` holds the approximations' valid ranges and the checks that refuse a model,
query or answer outside them instead of answering wrongly.
"""
