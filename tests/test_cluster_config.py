"""cluster.yaml validated offline against Ray's own cluster-config schema (no cloud calls)."""

import copy
import os

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster.yaml")


def load():
    with open(PATH) as fh:
        return yaml.safe_load(fh)


def test_cluster_yaml_validates_against_rays_schema():
    config = prepare_config(copy.deepcopy(load()))  # fills provider defaults, as `ray up` does
    validate_config(config)


def test_cluster_yaml_matches_the_design():
    c = load()
    assert c["provider"]["type"] == "aws"
    assert c["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-") and "ray-ml" not in c["docker"]["image"]
    types = c["available_node_types"]
    assert types[c["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] == 8 and types["gpu_worker"]["labels"] == {"cytoray-role": "train"}
    assert types["cpu_data_worker"]["labels"] == {"cytoray-role": "data"} and not types["cpu_data_worker"]["resources"]
    assert all(t.get("max_workers", 0) <= c["max_workers"] for t in types.values())
    head = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # dashboard / job API only through the SSH tunnel
    ports = [p["FromPort"] for p in c["provider"]["security_group"]["IpPermissions"]]
    assert ports == [22]  # nothing but SSH opened, and not to 0.0.0.0/0
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in c["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"])
    assert any("[gpu]" in cmd for cmd in c["setup_commands"])


def test_schema_validation_is_not_vacuous():
    import jsonschema
    import pytest

    bad = copy.deepcopy(load())
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    unknown = copy.deepcopy(load())
    unknown["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(unknown))
