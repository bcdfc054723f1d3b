"""The fusion head's secure functions over their documented ranges, with 2 CrypTen parties (processes)."""
from __future__ import annotations

import numpy as np
import torch

from cloud_aggregator.crypten_compat import load_crypten
from cloud_aggregator.inference import models

torch.set_num_threads(1)

#: the polynomial's range, the clip at |x| = 8, and far beyond (a DP-trained model's tanh input
#: reached 7,500; the fixed point holds |x| < 2^31)
TANH_X = torch.cat([torch.linspace(-12, 12, 801), torch.linspace(-1, 1, 201), torch.linspace(-8000, 8000, 161),
                    torch.tensor([-2.0 ** 30, -1e6, 1e6, 2.0 ** 30])])
#: softmax denominators across the documented range [0.05, 500], and numerators below them
DENOMINATORS = torch.tensor([[0.05], [0.3], [1.0], [3.0], [10.0], [100.0], [500.0]])
NUMERATORS = DENOMINATORS * torch.linspace(0.1, 1.0, 4)


def _evaluate() -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    crypten = load_crypten()
    from crypten import communicator

    comm = communicator.get()
    crypten.cfg.communicator.verbose = True
    x = crypten.cryptensor(TANH_X, src=0)
    comm.reset_communication_stats()
    tanh = models._tanh(x)
    rounds = int(comm.get_communication_stats()["rounds"])
    den = crypten.cryptensor(DENOMINATORS, src=0)
    num = crypten.cryptensor(NUMERATORS, src=0)
    base = (0.5 - den).div(2 ** models.EXP_LIMIT_SQUARINGS).add(1)
    for _ in range(models.EXP_LIMIT_SQUARINGS):
        base = base.square()
    quotient, one = models._goldschmidt_divide([num, den], den, base.mul(3).add(0.003), models.RECIPROCAL_ITERS)
    a, b = crypten.cryptensor(torch.randn(3, 1), src=0), crypten.cryptensor(torch.randn(2, 3, 4), src=0)
    ab, bb = models._mul_many([(a, b), (b, b)])
    products = np.concatenate([(ab - a * b).get_plain_text().flatten(), (bb - b.square()).get_plain_text().flatten()])
    return (tanh.get_plain_text().numpy(), quotient.get_plain_text().numpy(), one.get_plain_text().numpy(),
            products, rounds)


def test_tanh_division_and_batched_products_in_two_party_mpc():
    crypten = load_crypten()
    results = crypten.mpc.run_multiprocess(world_size=2)(_evaluate)()
    tanh, quotient, one, products, rounds = results[0]
    # tanh: exact algebra with a degree-7 polynomial, +-1 beyond the clip; within 1e-3 everywhere
    # (measured 1.3e-4), where the version before returned ~1e9 beyond |x| = 56
    assert np.abs(tanh - torch.tanh(TANH_X).numpy()).max() < 1e-3
    assert rounds == 18
    # Goldschmidt division: the quotients to 1e-3 across 4 decades, the denominator -> 1
    expected = (NUMERATORS / DENOMINATORS).numpy()
    assert np.abs(quotient - expected).max() < 1e-3 * expected.max()
    assert np.abs(one - 1).max() < 1e-3
    # batched products equal the separate ones up to fixed-point truncation (2^-16)
    assert np.abs(products).max() < 1e-3


def _fold(variances: list[float]) -> str:
    crypten = load_crypten()
    n = len(variances)
    params = {"conv.weight": crypten.cryptensor(torch.ones(n, 1, 1, 1), src=0),
              "bn.weight": crypten.cryptensor(torch.ones(n), src=0), "bn.bias": crypten.cryptensor(torch.zeros(n), src=0),
              "bn.running_mean": crypten.cryptensor(torch.zeros(n), src=0),
              "bn.running_var": crypten.cryptensor(torch.tensor(variances), src=0)}
    try:
        folded = models.fold_shared_batchnorm(params, [("conv", "bn", 1e-5)])
    except models.InferenceError as err:
        return err.reason
    return f"{folded['conv.weight'].get_plain_text().flatten()[0].item():.4f}"


def test_batchnorm_fold_refuses_variances_beyond_its_inverse_sqrt():
    """From var = 204.8 CrypTen's 1/sqrt returns -1/sqrt(var) (measured): such a model is refused, not folded."""
    run = load_crypten().mpc.run_multiprocess(world_size=2)(_fold)
    assert run([4.0, 150.0]) == ["0.5000"] * 2
    assert run([4.0, 300.0]) == ["model_out_of_range"] * 2
