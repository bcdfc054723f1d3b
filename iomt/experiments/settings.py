"""Settings shared by every experiment, their command-line flags, and the `--quick` preset."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from iomt.federation import FederationSpec

#: The paper's method, "ours" in the experiments' tables: a method label, not a strategy. It
#: is the cloud's FedAvg on the multimodal attention model with DP on every hospital's
#: contribution, aggregated on secret shares (as every federation here is).
OURS = {"strategy": "fedavg", "dp": True}

log = logging.getLogger(__name__)

#: Model used by the experiments by default: the shared architecture (CNN, EHR MLP, 2-layer
#: LSTM, bag of word and word-pair embeddings, attention fusion) at a size two shared CPU
#: cores can train many times over (about 10x cheaper than ModelConfig's defaults); text_len
#: and text_layers apply to `--text-encoder transformer` only. `--quick` shrinks it further.
EXPERIMENT_MODEL: dict = {"dim": 16, "cnn_channels": (4, 8, 16), "ehr_hidden": 16, "lstm_hidden": 16,
                          "signal_pool": 8, "text_len": 32, "text_layers": 1}
QUICK_MODEL: dict = {"dim": 8, "cnn_channels": (2, 4, 8), "ehr_hidden": 8, "lstm_hidden": 8,
                     "lstm_layers": 1, "text_len": 16, "text_layers": 1, "text_vocab": 256}


@dataclass(frozen=True)
class Settings:
    """One experiment invocation. Defaults follow the source paper where it is affordable on
    two CPU cores (10 hospitals, non-IID, 70/15/15 by patient) and are documented in RESULTS.md."""

    out: Path
    seeds: int = 2
    hospitals: int = 10
    patients: int = 40          # per hospital
    duration_s: float = 16.0    # seconds of wearable signal per patient (two 8 s windows)
    rounds: int = 20
    local_epochs: int = 2
    lr: float = 1e-3            # Adam, as in the paper
    folds: int = 1              # 1 = one 70/15/15 split; k > 1 = k-fold cross-validation
    data: Path | None = None    # a bring-your-own-data folder instead of simulated hospitals
    noise_multiplier: float = 0.1
    clip_norm: float = 1.0
    prox_mu: float = 0.01
    parties: int = 3
    target_epsilon: float = 8.0           # DP-SGD: patient-level epsilon of a whole run (table2 ours_dpsgd)
    # DP-SGD wants larger steps than plain Adam (measured 2026-11-30, 4 simulated hospitals: at
    # epsilon 8, lr 3e-2 reached 79 % test accuracy where 3e-3 stayed near chance)
    dp_lrs: tuple[float, ...] = (1e-2, 3e-2)   # DP-SGD: learning rates tried, chosen on validation
    dp_clips: tuple[float, ...] = (0.5, 1.0)   # DP-SGD: per-patient clip norms tried, chosen on validation
    quick: bool = False
    model: dict = field(default_factory=lambda: dict(EXPERIMENT_MODEL))

    @classmethod
    def from_args(cls, args: argparse.Namespace, name: str) -> Settings:
        values = {k: getattr(args, k) for k in ("seeds", "hospitals", "patients", "rounds", "local_epochs", "lr",
                                                  "folds", "noise_multiplier", "clip_norm", "duration",
                                                  "target_epsilon")
                  if getattr(args, k, None) is not None}
        if "duration" in values:
            values["duration_s"] = values.pop("duration")
        base = cls.quick_preset(Path(".")) if args.quick else cls(out=Path("."))
        settings = dataclasses.replace(base, **values)
        for key in ("fusion", "text_encoder"):
            if getattr(args, key, None):
                settings = dataclasses.replace(settings, model={**settings.model, key: getattr(args, key)})
        out = Path(args.out) if args.out else Path("results") / name
        for key in ("dp_lrs", "dp_clips"):
            if getattr(args, key, None):
                settings = dataclasses.replace(settings, **{key: tuple(float(v) for v in getattr(args, key).split(","))})
        data = Path(args.data) if getattr(args, "data", None) else None
        return dataclasses.replace(settings, out=out, data=data, quick=bool(args.quick))

    @classmethod
    def quick_preset(cls, out: Path) -> Settings:
        """A few patients, two rounds, one seed and a tiny model: end to end in seconds."""
        return cls(out=out, seeds=1, hospitals=3, patients=9, duration_s=8.0, rounds=2, local_epochs=1, quick=True,
                   model=dict(QUICK_MODEL), dp_lrs=(1e-3,), dp_clips=(1.0,))

    def spec(self, method: str, seed: int, **overrides) -> FederationSpec:
        """The federation of ``method``: a cloud strategy name, or ``"ours"`` (:data:`OURS`)."""
        values = dict(**(OURS if method == "ours" else {"strategy": method}), rounds=self.rounds, local_epochs=self.local_epochs, lr=self.lr,
                      prox_mu=self.prox_mu, clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier,
                      parties=self.parties, seed=seed)
        values.update(overrides)
        return FederationSpec(**values)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Every (seed, fold) pair to run."""
        for seed in range(self.seeds):
            for fold in range(max(1, self.folds)):
                yield seed, fold

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["data"] = str(self.data) if self.data else None
        return d


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny configuration that runs in seconds (for tests)")
    parser.add_argument("--out", default=None, help="output folder (default results/NAME)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds; results give mean and std")
    parser.add_argument("--hospitals", type=int, default=None, help="number of hospitals (default 10)")
    parser.add_argument("--patients", type=int, default=None, help="simulated patients per hospital")
    parser.add_argument("--duration", type=float, default=None, help="seconds of wearable signal per patient")
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds")
    parser.add_argument("--local-epochs", dest="local_epochs", type=int, default=None,
                        help="local epochs per round")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3, as the paper)")
    parser.add_argument("--folds", type=int, default=None,
                        help="k-fold cross-validation by patient (default 1: one 70/15/15 split)")
    parser.add_argument("--noise-multiplier", dest="noise_multiplier", type=float, default=None,
                        help="DP noise multiplier sigma for 'ours'")
    parser.add_argument("--clip-norm", dest="clip_norm", type=float, default=None,
                        help="DP clipping bound C on each update for 'ours'")
    parser.add_argument("--epsilon", dest="target_epsilon", type=float, default=None,
                        help="patient-level DP-SGD epsilon of a run (table2's ours_dpsgd; default 8)")
    parser.add_argument("--dp-lrs", dest="dp_lrs", default=None,
                        help="DP-SGD learning rates to choose from on validation patients (default 1e-2,3e-2)")
    parser.add_argument("--dp-clips", dest="dp_clips", default=None,
                        help="DP-SGD per-patient clip norms to choose from on validation patients (default 0.5,1)")
    parser.add_argument("--fusion", choices=("attention", "quadratic"), default=None,
                        help="fusion layer and head (default attention, the paper's; quadratic: the "
                             "MPC-friendly variant, see protocols/model.py)")
    parser.add_argument("--text-encoder", dest="text_encoder", choices=("bag", "transformer", "minilm"), default=None,
                        help="notes encoder (default bag: every word and word pair of the whole note; "
                             "transformer: the first text_len tokens; see protocols/model.py)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these small models gain nothing from more, and "
                             "several experiments can then share the cores)")
    parser.add_argument("--data", default=None,
                        help="bring-your-own-data folder of hospital folders (docs/byod.md) instead of simulated data")


def load(settings: Settings, seed: int):
    """The federation an experiment runs on for ``seed``."""
    from iomt.experiments.data import byod_federation, simulated_federation
    if settings.data is not None:
        return byod_federation(settings.data, settings.hospitals)
    return simulated_federation(settings.hospitals, settings.patients, settings.duration_s, seed)


def prepared_runs(settings: Settings):
    """Every run's ``(seed, fold, federation, model config, split)``, ready to train on."""
    from iomt.experiments.data import split
    for seed, fold in settings.runs():
        fed = load(settings, seed)
        yield seed, fold, fed, fed.model_config(**settings.model), split(fed, seed, settings.folds, fold)
