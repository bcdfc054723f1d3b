"""A party's files are private to its user: shares, receipts and published global versions
0600, the folders it makes 0700 (whatever the umask)."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from cloud_aggregator.inference.publish import publish_shared_model
from cloud_aggregator.store import PartyStore, UploadRefused, check_id
from protocols.model_files import GlobalModelMeta


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_published_global_share_is_private(tmp_path, loose_umask):
    store = PartyStore(tmp_path / "p0")
    meta = GlobalModelMeta(version=1, round=1, parties=2, party_index=0, denominator=1, participants=["h1"],
                           spec=[("w", [6])])
    store.write_global(1, {"w": np.arange(6, dtype=np.int64)}, meta)
    vdir = store.global_dir(1)
    assert _mode(vdir / "share.npz") == 0o600 and _mode(vdir / "meta.json") == 0o600
    assert _mode(vdir) == 0o700 and _mode(tmp_path / "p0") == 0o700
    assert _mode(tmp_path / "p0" / "global") == 0o700 and _mode(tmp_path / "p0" / "rounds") == 0o700
    assert _mode(tmp_path / "p0" / "global" / "LATEST") == 0o600


def test_publish_shared_model_writes_private_files(tmp_path, loose_umask):
    dirs = [tmp_path / "a", tmp_path / "b"]
    publish_shared_model(dirs, [{"w": np.ones((2, 2), np.float32)}], [3], "toy", {})
    for d in dirs:
        assert {_mode(p) for p in (d / "global").rglob("*") if p.is_file()} == {0o600}
        assert {_mode(p) for p in (d / "global").rglob("*") if p.is_dir()} == {0o700}


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "h..1", "", ".h", "x" * 65, "h\n1"])
def test_store_refuses_ids_that_are_not_plain(bad):
    with pytest.raises(UploadRefused) as err:
        check_id(bad)
    assert err.value.reason == "bad_id"
