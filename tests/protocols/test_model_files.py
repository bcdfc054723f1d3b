"""The global model's meta.json and the coordinator's model file: typed, and byte-compatible
with the dicts they replaced, so stores written before still load."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from protocols.errors import ConfigError
from protocols.model_files import CoordinatorModelFile, GlobalModelMeta

#: meta.json as cloud_aggregator.party wrote it as a dict: json.dumps(meta, indent=1)
OLD_META = {"version": 3, "round": 3, "parties": 2, "party_index": 1, "denominator": 120,
            "participants": ["h1", "h2"], "spec": [["w", [2, 3]], ["b", [3]]],
            "model": {"arch": "toy", "config": {"hidden": 20}}, "strategy": "fedadam",
            "server_opt": {"opt": "adam", "lr": 0.01}}


@pytest.mark.parametrize("server_opt", [True, False])
def test_meta_json_is_byte_compatible_with_the_old_dict(server_opt):
    old = dict(OLD_META) if server_opt else {k: v for k, v in OLD_META.items() if k != "server_opt"}
    text = json.dumps(old, indent=1)
    meta = GlobalModelMeta.from_json(text)
    assert meta.to_json() == text
    assert meta.param_spec() == [("w", (2, 3)), ("b", (3,))] and meta.model.arch == "toy"


def test_meta_readers_ignore_keys_a_newer_party_adds():
    meta = GlobalModelMeta.from_json(json.dumps({**OLD_META, "added_later": 1}))
    assert meta.denominator == 120 and "added_later" not in meta.to_json()


@pytest.mark.parametrize("bad", [{"denominator": 0}, {"parties": 1}, {"spec": "w"}, {"version": None}])
def test_meta_refuses_what_no_party_writes(bad):
    with pytest.raises(ValidationError):
        GlobalModelMeta.from_json(json.dumps({**OLD_META, **bad}))


def test_coordinator_model_file_round_trips_what_the_edge_writes(tmp_path):
    from edge_server.federation.client import write_model_file

    state = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    path = tmp_path / "model.json"
    write_model_file(path, "multimodal", {"hidden": 8}, state, init_seed=5)
    assert set(json.loads(path.read_text())) == {"arch", "config", "spec", "init_seed"}
    model = CoordinatorModelFile.read(path)
    assert (model.arch, model.config, model.init_seed) == ("multimodal", {"hidden": 8}, 5)
    assert model.param_spec() == [("w", (2, 3)), ("b", (3,))]


def test_coordinator_model_file_defaults_and_refuses_typos(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"spec": [["w", [3]]]}))
    model = CoordinatorModelFile.read(path)
    assert (model.arch, model.config, model.init_seed) == ("generic", {}, 0)
    path.write_text(json.dumps({"spec": [["w", [3]]], "init_sede": 4}))
    with pytest.raises(ConfigError, match="init_sede"):
        CoordinatorModelFile.read(path)
    with pytest.raises(ConfigError, match="model file"):
        CoordinatorModelFile.read(tmp_path / "missing.json")
