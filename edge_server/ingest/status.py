"""`iomt edge status`: what an edge has stored and rejected, read straight from its store, and the
privacy its training has spent (its ledger, ``privacy_accountant.json``).

Exit codes: 0 printed; 1 neither a store nor a privacy ledger in ``--data-dir``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edge_server.training.privacy import read_ledger
from edge_server.ingest.sqlite_store import SqliteStore
from protocols.errors import IomtError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="the edge's data directory")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _ago(ts: float, now: float) -> str:
    secs = max(0.0, now - ts)
    return f"{secs:.0f}s ago" if secs < 120 else f"{secs / 60:.0f}min ago" if secs < 7200 else f"{secs / 3600:.1f}h ago"


def render_privacy(privacy: dict | None) -> str:
    """One line on the privacy ledger's summary (:func:`edge_server.training.privacy.read_ledger`)."""
    if privacy is None:
        return "privacy: nothing trained yet (no ledger)"
    eps = "inf (a round without noise)" if privacy["epsilon"] is None else f"{privacy['epsilon']:.3g}"
    return (f"privacy: epsilon {eps} spent at delta {privacy['delta']:g} ({privacy['unit']} level, "
            f"{'/'.join(privacy['mechanisms']) or '-'}) over {privacy['rounds']} rounds, {privacy['steps']} steps")


def render(status: dict, now: float | None = None) -> str:
    """A human-readable summary of :meth:`Store.status` output (plus ``privacy`` when present)."""
    now = time.time() if now is None else now
    if "stored" not in status:
        return render_privacy(status.get("privacy"))
    st = status["stored"]
    lines = [f"hospital {status.get('hospital') or '?'}: {st['total']} messages stored "
             f"({st['samples']} samples), {status['rejected_total']} rejected, "
             f"{status['duplicates']} duplicates dropped, {status['received']} deliveries"]
    lines.append("stored by stream:   " + (", ".join(f"{k} {v}" for k, v in st["by_stream"].items()) or "-"))
    lines.append("stored by modality: " + (", ".join(f"{k} {v}" for k, v in st["by_modality"].items()) or "-"))
    lines.append("rejected by reason: " + (", ".join(f"{k} {v}" for k, v in status["rejected"].items()) or "-"))
    lines.append(f"devices ({len(status['devices'])}):")
    for device, info in status["devices"].items():
        seen = status["last_seen"].get(device)
        online = {True: "online", False: "offline", None: "presence unknown"}[info["online"]]
        lines.append(f"  {device:24} {info['class']:9} patient {info['patient_id'] or '-':12} "
                     f"{st['by_device'].get(device, 0):7} stored  {online:16} "
                     f"last seen {_ago(seen, now) if seen else 'never'}")
    if "privacy" in status:
        lines.append(render_privacy(status["privacy"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        privacy = read_ledger(args.data_dir)
    except IomtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        store = SqliteStore(args.data_dir, readonly=True)
    except FileNotFoundError as err:
        if privacy is None:
            print(f"error: {err}", file=sys.stderr)
            return 1
        status = {"privacy": privacy}  # e.g. a bring-your-own-data folder: no store, but a ledger
    else:
        with store:
            status = {**store.status(), "privacy": privacy}
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0
