"""`iomt experiment NAME`: reproduce the source papers' experiments on simulated hospitals or
on a bring-your-own-data folder; each writes CSV, PNG and JSON into ``--out``.

Experiments are imported only when chosen, so `iomt experiment --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

log = logging.getLogger(__name__)

#: name -> (module:function, help line)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "table2": ("iomt.experiments.paper000:table2",
               "paper 000 Table II: centralized, FedAvg, FedProx, unimodal federated, ours (DP + SMPC, local or "
               "distributed DP), logistic-regression baselines"),
    "table3": ("iomt.experiments.paper000:table3",
               "paper 000 Table III: modality ablation, each modality alone, and logistic-regression baselines"),
    "table4": ("iomt.experiments.paper000:table4",
               "paper 000 Table IV: global accuracy across rounds for FedAvg, FedProx, ours"),
    "fig4": ("iomt.experiments.paper000:fig4", "paper 000 Fig. 4: privacy-utility trade-off across epsilon"),
    "local_vs_global": ("iomt.experiments.local_global:local_vs_global",
                        "paper 001: local-only vs global model accuracy per hospital, beside "
                        "logistic regressions (local and pooled)"),
    "encrypted_inference": ("iomt.experiments.encrypted:encrypted_inference",
                            "paper 002: encrypted inference time and accuracy vs batch size (ResNet-18, AlexNet)"),
    "encrypted_fusion": ("iomt.experiments.encrypted_fusion:encrypted_fusion",
                         "the federated multimodal model's encrypted fusion head, attention vs quadratic: "
                         "time, rounds and agreement with plaintext vs batch size"),
}
EXPORT = "export-breast-cancer"


def register(sub: argparse._SubParsersAction, name: str, help_line: str) -> None:
    from iomt.experiments.settings import add_common_arguments

    parser = sub.add_parser(name, help=help_line, description=help_line)
    subs = parser.add_subparsers(dest="experiment", metavar="NAME", required=True)
    for exp, (_, text) in EXPERIMENTS.items():
        p = subs.add_parser(exp, help=text, description=text)
        add_common_arguments(p)
        if exp == "table2":
            p.add_argument("--methods", default=None,
                           help="comma-separated subset of centralized,fedavg,fedprox,unimodal_federated,ours,"
                                "ours_distributed,ours_dpsgd,baselines (default: all; baselines = logistic "
                                "regressions, pooled and per hospital)")
        if exp == "fig4":
            p.add_argument("--dp", choices=("sgd", "update"), default="sgd",
                           help='"sgd" (default): patient-level DP-SGD at each target epsilon; "update": the '
                                "paper's update-level noise at several noise multipliers")
            p.add_argument("--epsilons", default=None,
                           help="DP-SGD: comma-separated patient-level epsilons (default 0.5,1,2,4,8,inf)")
        if exp in ("encrypted_inference", "encrypted_fusion"):
            p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,5,10,25)")
        if exp == "encrypted_inference":
            p.add_argument("--image-size", dest="image_size", type=int, default=None,
                           help="image side (default 224, quick 32)")
        p.set_defaults(func=_run)
    from iomt.experiments import breast_cancer
    p = subs.add_parser(EXPORT, help="write scikit-learn's breast cancer data as a BYOD folder (non-IID hospitals)",
                        description=breast_cancer.__doc__.splitlines()[0])
    breast_cancer.add_arguments(p)
    p.set_defaults(func=breast_cancer.run)


def run_experiment(name: str, settings, **kwargs) -> dict:
    """Run experiment ``name`` with ``settings``; returns its JSON payload."""
    target, _ = EXPERIMENTS[name]
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(settings, **kwargs)


def _run(args: argparse.Namespace) -> int:
    import torch

    from iomt.experiments.settings import Settings
    from protocols.errors import IomtError

    settings = Settings.from_args(args, args.experiment)
    if args.experiment != "encrypted_inference":
        # Small models: extra intra-op threads mostly spin. Measured 2026-11-23 on 2 cores, two
        # experiments side by side: table4 (3 seeds x 60 rounds) took 6 CPU-min with 1 thread
        # each; with 2 threads each it had used 10.7 CPU-min without finishing.
        torch.set_num_threads(args.threads)
    kwargs = {}
    if args.experiment == "table2" and args.methods:
        kwargs["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.experiment == "fig4":
        kwargs["dp"] = args.dp
        if args.epsilons:
            kwargs["epsilons"] = tuple(float(e) for e in args.epsilons.split(","))
    if args.experiment in ("encrypted_inference", "encrypted_fusion") and args.batches:
        kwargs["batches"] = tuple(int(b) for b in args.batches.split(","))
    if args.experiment == "encrypted_inference":
        if args.image_size:
            kwargs["image_size"] = args.image_size
    try:
        payload = run_experiment(args.experiment, settings, **kwargs)
    except IomtError as err:
        print(f"iomt experiment {args.experiment}: {err}", file=sys.stderr)
        return 1
    print(f"{args.experiment}: results in {settings.out}")
    for row in payload.get("summary", []):
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                               if not k.endswith("_std")))
    return 0
