"""`iomt cloud backup` / `restore`: party 1 and the coordinator, backed up while they run in the
middle of a round (two of three uploads in), are killed and restored onto fresh folders (a
fresh host); started there, they finish the round, and the global model is plaintext FedAvg."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest

from cloud_aggregator.backup import BackupError, make_backup
from cloud_aggregator.restore import restore_backup
from iomt.local_cloud import LocalCloud, toy_state
from iomt.supervisor import run_iomt

COUNTS = {"h1": 40, "h2": 125, "h3": 7}


def _plain_fedavg(states: dict, counts: dict) -> dict:
    total = sum(counts[h] for h in states)
    return {k: sum(counts[h] * s[k].astype(np.float64) for h, s in states.items()) / total
            for k in next(iter(states.values()))}


@pytest.mark.integration
def test_party_and_coordinator_restored_on_a_fresh_host_finish_the_round(tmp_path):
    cluster = LocalCloud.secagg(tmp_path, 2, list(COUNTS), round_timeout=600.0, min_hospitals=3).start()
    clients = {}
    try:
        clients = cluster.federated_clients()
        cfg = cluster.wait_round(clients["h1"], 1, states=("open",)).config
        states = {h: toy_state(int(h[1:])) for h in COUNTS}
        for h in ("h1", "h2"):
            clients[h].upload(cfg, states[h], COUNTS[h])
        # a write in progress at backup time (a temporary file) stays out of the archive
        (cluster.party_dir(1) / "rounds" / "r000001" / ".h3.share.tmp").write_bytes(b"half")
        etc = tmp_path / "etc-party-1"
        etc.mkdir()
        shutil.copy(cluster.registry, etc / "registry.json")
        shutil.copy(cluster.key_file("party-1"), etc / "party-1.json")

        # Execute: online backups (the services keep running), then both hosts are lost
        run_iomt("cloud", "backup", "--data-dir", str(cluster.party_dir(1)), "--out", str(tmp_path / "p1.tar.gz"),
                 "--etc", str(etc))
        run_iomt("cloud", "backup", "--data-dir", str(tmp_path / "coordinator"), "--out",
                 str(tmp_path / "coord.tar.gz"))
        cluster.kill_party(1)
        cluster.kill_coordinator()
        fresh = tmp_path / "fresh-host"
        run_iomt("cloud", "restore", str(tmp_path / "p1.tar.gz"), "--data-dir", str(fresh / "party-1"),
                 "--etc", str(fresh / "etc"))
        run_iomt("cloud", "restore", str(tmp_path / "coord.tar.gz"), "--data-dir", str(fresh / "coordinator"))
        cluster.party_dirs[1] = fresh / "party-1"
        at = cluster.coord_args.index("--data-dir") + 1
        cluster.coord_args[at] = str(fresh / "coordinator")
        cluster.start_party(1)
        cluster.start_coordinator()
        clients["h3"].upload(cfg, states["h3"], COUNTS["h3"])
        st = cluster.wait_round(clients["h1"], 1)

        # Assert: the restored pair finished the round with all three hospitals, exactly FedAvg
        assert st.state == "done", cluster.logs()
        assert st.participants == ["h1", "h2", "h3"] and st.denominator == sum(COUNTS.values())
        _, model = clients["h1"].fetch_global(1)
        plain = _plain_fedavg(states, COUNTS)
        assert max(np.abs(model[k] - plain[k]).max() for k in plain) <= 1e-4
        assert "coordinator resumed: 1 rounds known" in cluster.log("coordinator")
        assert not (fresh / "party-1" / "rounds" / "r000001" / ".h3.share.tmp").exists()
        assert (fresh / "etc" / "party-1.json").read_bytes() == cluster.key_file("party-1").read_bytes()
        assert oct((fresh / "party-1" / "rounds" / "r000001" / "h1.share").stat().st_mode & 0o777) == "0o600"
    finally:
        for c in clients.values():
            c.close()
        cluster.stop()


def test_restore_refuses_a_damaged_archive_and_a_used_folder(tmp_path):
    data = tmp_path / "party"
    (data / "rounds" / "r000001").mkdir(parents=True)
    (data / "rounds" / "r000001" / "h1.share").write_bytes(b"share")
    (data / "rounds" / "r000001" / "h1.json").write_bytes(b"{}")
    (data / "rounds" / "r000001" / "h2.share").write_bytes(b"no receipt yet")  # not acknowledged: left out
    (data / "global" / "v000001").mkdir(parents=True)
    for name in ("share.npz", "meta.json"):
        (data / "global" / "v000001" / name).write_bytes(b"x")
    (data / "global" / "LATEST").write_text("0\n")  # behind the folders: recomputed
    (data / "audit").mkdir()
    (data / "audit" / "inference.jsonl").write_bytes(b'{"a": 1}\n{"b": ')  # a line being appended
    manifest = make_backup(data, tmp_path / "b.tar.gz")
    assert manifest["role"] == "party"
    assert set(manifest["files"]) == {"data/rounds/r000001/h1.share", "data/rounds/r000001/h1.json",
                                      "data/global/v000001/share.npz", "data/global/v000001/meta.json",
                                      "data/global/LATEST", "data/audit/inference.jsonl"}
    restore_backup(tmp_path / "b.tar.gz", tmp_path / "new")
    assert (tmp_path / "new" / "global" / "LATEST").read_text() == "1\n"
    assert (tmp_path / "new" / "audit" / "inference.jsonl").read_bytes() == b'{"a": 1}\n'
    with pytest.raises(BackupError, match="not empty"):
        restore_backup(tmp_path / "b.tar.gz", tmp_path / "new")
    # a damaged file: refused before anything is written
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    members["data/rounds/r000001/h1.share"] = b"shaRe"
    with tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(BackupError, match="damaged"):
        restore_backup(tmp_path / "bad.tar.gz", tmp_path / "other")
    assert not (tmp_path / "other").exists()
    assert json.loads(members["manifest.json"])["format"] == 1
