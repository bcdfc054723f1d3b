"""The privacy options `iomt edge train` and `iomt edge federate` share, and what they mean.

By default both train with patient-level DP-SGD at ε = 8, δ = 1e-5 for the whole run (all
planned rounds), and the data directory's ledger refuses any round past that ε in all, across
restarts and re-runs (``--epsilon-budget`` raises it deliberately). ``--dp update`` is the
source paper's clip-and-noise of the whole update (to reproduce its Table II); ``--dp off``
trains without privacy.
"""
from __future__ import annotations

import argparse

#: Default target ε of a run and δ (patient level).
DEFAULT_EPSILON, DEFAULT_DELTA = 8.0, 1e-5


class DpOptionError(ValueError):
    """The privacy options contradict each other."""


def add_dp_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("differential privacy")
    g.add_argument("--dp", choices=("sgd", "update", "off"), default="sgd",
                   help='"sgd" (default): patient-level DP-SGD (per-patient clipping, Poisson sampling, noise on '
                        'every step); "update": the source paper\'s clip and noise of the whole update (Table II); '
                        '"off": no privacy')
    g.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                   help="sgd: target epsilon of the whole run at --delta; sets the noise (default 8)")
    g.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="delta of every epsilon (default 1e-5)")
    g.add_argument("--clip-norm", type=float, default=None,
                   help="sgd: L2 bound on each patient's gradient (default 1.0); update: on the whole update")
    g.add_argument("--noise-multiplier", type=float, default=None,
                   help="sigma, noise std = sigma x clip norm (sgd: instead of calibrating from --epsilon)")
    g.add_argument("--epsilon-budget", type=float, default=None,
                   help="refuse any round that would take this data directory's ledger past this epsilon "
                        "(sgd default: --epsilon; spending adds up across runs)")


def dp_fields(args: argparse.Namespace, planned_rounds: int) -> dict:
    """:class:`~edge_server.training.TrainConfig` fields for the parsed privacy options."""
    if args.dp == "off":
        return {"dp": "off"}
    if args.epsilon is not None and not 0 < args.epsilon < float("inf"):
        raise DpOptionError(f"--epsilon must be positive and finite (no privacy is --dp off), got {args.epsilon}")
    if args.dp == "update":
        if args.clip_norm is None:
            raise DpOptionError("--dp update needs --clip-norm (and --noise-multiplier)")
        return {"dp": "update", "clip_norm": args.clip_norm, "noise_multiplier": args.noise_multiplier or 0.0,
                "delta": args.delta, "epsilon_budget": args.epsilon_budget}
    budget = args.epsilon_budget if args.epsilon_budget is not None else args.epsilon
    return {"dp": "sgd", "clip_norm": args.clip_norm or 1.0, "noise_multiplier": args.noise_multiplier or 0.0,
            "target_epsilon": None if args.noise_multiplier else args.epsilon, "planned_rounds": planned_rounds,
            "delta": args.delta, "epsilon_budget": budget}
