"""Prefetched Beaver triples: two CrypTen parties and the TTP as real processes (fork).

The fusion head runs three times: traced with on-demand triples, then from triples fetched
in between (far fewer rounds for party 0, same result), then with the cache exhausted
(falls back to on-demand triples instead of failing).
"""
from __future__ import annotations

import torch

from cloud_aggregator.crypten_compat import load_crypten
from protocols.model import ModelConfig, build_model

torch.set_num_threads(1)
crypten = load_crypten()

DIM, BATCH = 8, 6


def _party() -> dict:
    import crypten.communicator as comm

    from cloud_aggregator.inference.models import EncryptedFusionHead
    from cloud_aggregator.mpc.triples import TriplePrefetcher

    torch.set_num_threads(1)
    torch.manual_seed(3)
    model = build_model(ModelConfig(dim=DIM)).eval()
    params = {k: crypten.cryptensor(v, src=0) for k, v in model.state_dict().items()
              if k.startswith(("fusion.", "head."))}
    head = EncryptedFusionHead({"dim": DIM, "num_classes": 3}, params)
    with crypten.no_grad():
        head.prepare()  # once per model, before any request (as the worker does)
    feats, mask = torch.randn(BATCH, 4, DIM), torch.ones(BATCH, 4)
    mask[0, 1:] = 0.0
    enc = {"features": crypten.cryptensor(feats, src=0), "mask": crypten.cryptensor(mask, src=0)}
    pf = TriplePrefetcher(crypten)
    signature = ("v1", (BATCH, 4, DIM))
    rounds, logits, cached = [], [], []
    for step in range(3):
        comm.get().reset_communication_stats()
        with crypten.no_grad():
            out = pf.run(signature, lambda: head.forward(enc))
        rounds.append(comm.get().get_communication_stats()["rounds"])
        logits.append(out["logits"].get_plain_text().numpy())
        cached.append(pf.fingerprint())
        if step == 0:
            pf.refill(signature)
            cached.append(pf.fingerprint())
    with torch.no_grad():
        ref = model.head(model.fusion(feats, mask)[0])
    return {"rank": comm.get().get_rank(), "rounds": rounds, "logits": logits, "cached": cached,
            "plan": len(pf.plans[signature]), "ref": ref.numpy()}


def test_prefetched_triples_cut_rounds_and_keep_results():
    old = (crypten.cfg.mpc.provider, crypten.cfg.communicator.verbose)
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.communicator.verbose = True
    try:
        results = crypten.mpc.run_multiprocess(world_size=2)(_party)()
    finally:
        crypten.cfg.mpc.provider, crypten.cfg.communicator.verbose = old
    assert results is not None, "a party failed"
    by_rank = {r["rank"]: r for r in results}
    p0 = by_rank[0]
    assert p0["plan"] > 20  # the trace recorded every triple request
    # after step 0: none cached, then one request's worth, then all used, then none left
    assert by_rank[0]["cached"] == by_rank[1]["cached"] == [0, p0["plan"], 0, 0]
    on_demand, prefetched, exhausted = p0["rounds"]
    assert prefetched <= on_demand / 3  # only the parties' own openings remain online
    assert exhausted == on_demand  # cache exhausted: back to on-demand triples, no failure
    for got in p0["logits"]:
        assert abs(got - p0["ref"]).max() < 1e-2


class _Provider:
    """Stands in for CrypTen's provider only where no MPC is needed (disabled prefetcher)."""

    def __init__(self):
        self.tuple_cache, self.request_cache, self.traced = {}, [], []

    def trace(self, on):
        self.traced.append(on)


def test_disabled_prefetcher_neither_traces_nor_fills():
    from types import SimpleNamespace

    from cloud_aggregator.mpc.triples import TriplePrefetcher

    provider = _Provider()
    fake = SimpleNamespace(mpc=SimpleNamespace(get_default_provider=lambda: provider))
    pf = TriplePrefetcher(fake, enabled=False)
    assert pf.run("sig", lambda: 42) == 42 and pf.run("sig", lambda: 43) == 43
    assert pf.refill("sig") == 0 and pf.fingerprint() == 0 and provider.traced == []


def test_validation_flag_is_cached_but_follows_config_changes(monkeypatch):
    from crypten.cryptensor import CrypTensor

    assert getattr(CrypTensor.__dict__["__getattribute__"], "_iomt_cached_flag", False)
    calls = []
    monkeypatch.setattr(crypten.debug, "validate_correctness",
                        lambda tensor, function, name: calls.append(name) or function)
    x = crypten.mpc.MPCTensor.__new__(crypten.mpc.MPCTensor)  # attribute access only, no MPC
    x.add  # noqa: B018
    assert calls == []
    with crypten.cfg.temp_override({"debug.validation_mode": True}):
        x.add  # noqa: B018
    x.add  # noqa: B018
    assert calls and calls[-1] == "add" and calls.count("add") == 1  # read while overridden only
