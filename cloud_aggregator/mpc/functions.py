"""Functions on shared tensors that more than one job kind uses: release re-randomisation
and the inverse square root (LayerNorm, the BatchNorm fold, the FedAdam/FedYogi step)."""
from __future__ import annotations

from typing import Any

import numpy as np

#: inv_sqrt(wide=True): above SPLIT the argument is divided by RESCALE and the result by
#: RESCALE_SQRT (public integers: a multiplier like 1e-4 would itself be rounded to 16 bits, 7% off)
SPLIT = 100.0
RESCALE, RESCALE_SQRT = 10_000, 100


def rerandomise(value: Any, device: str = "cpu") -> np.ndarray:
    """This party's int64 share of ``value`` plus a fresh sharing of zero (PRZS).

    Every share released or stored is re-randomised: it is fresh whatever the circuit left."""
    from cloud_aggregator.crypten_compat import load_crypten  # torch and onnx: only in the MPC process

    crypten = load_crypten()
    zero = crypten.mpc.primitives.ArithmeticSharedTensor.PRZS(value.size(), device=device)
    return (value._tensor.share + zero.share).cpu().numpy().astype(np.int64)


def inv_sqrt(x: Any, iters: int, *, method: str = "goldschmidt", wide: bool = False) -> Any:
    """1/sqrt(x) of a shared ``x``, from CrypTen's initial guess ``2.2 exp(-x/2 - 0.2) + 0.2 - x/1024``.

    One routine, two iterations, because the callers pay for different things:
    ``"goldschmidt"`` (coupled iterations, 2 rounds each) is for per-request circuits such as
    LayerNorm, where rounds are latency; ``"newton"`` (CrypTen's own ``inv_sqrt`` with ``iters``
    Newton steps, 3 rounds each) is for the once-per-model BatchNorm fold and the once-per-round
    server step, whose measured ranges (inference.ranges, server_opt) were taken with it.
    Both are valid on about [0.01, 200]: the guess is negative from 204.8 on. ``wide=True``
    extends the range to [0.01, 2e6] by also evaluating on ``x / RESCALE`` and selecting with
    one secure comparison (the unused, possibly diverged, branch is multiplied by 0).
    """
    if wide:
        small = inv_sqrt(x, iters, method=method)
        big = inv_sqrt(x.div(RESCALE), iters, method=method).div(RESCALE_SQRT)
        use_big = x.gt(SPLIT)  # shares of 0/1
        return small + (big - small) * use_big
    from cloud_aggregator.crypten_compat import load_crypten

    crypten = load_crypten()
    if method == "newton":
        with crypten.cfg.temp_override({"functions.sqrt_nr_iters": iters}):
            return x.inv_sqrt()
    if method != "goldschmidt":
        raise ValueError(f"method must be 'goldschmidt' or 'newton', got {method!r}")
    y0 = (x.div(2).add(0.2).neg()).exp().mul(2.2).add(0.2) - x.div(1024)  # CrypTen's initial guess
    g = x * y0  # -> sqrt(x)
    h = y0.div(2)  # -> 1 / (2 sqrt(x))
    for _ in range(iters):
        r = 0.5 - g * h
        g, h = (crypten.stack([g, h]) * r.unsqueeze(0)).add(crypten.stack([g, h])).unbind(0)
    return h.mul(2)
