from dataclasses import dataclass, field

import pytest
import yaml

from cytoray import config
from cytoray.storage import StorageConfig


@dataclass
class Inner:
    batch_size: int = 32
    ratio: float = 0.5


@dataclass
class Schema:
    name: str = "???"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    storage: StorageConfig = field(default_factory=StorageConfig)


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_merge_order_defaults_then_files_then_cli(tmp_path):
    defaults = write(tmp_path, "d.yaml", {"name": "base", "inner": {"batch_size": 8, "ratio": 0.1}})
    override = write(tmp_path, "o.yaml", {"inner": {"batch_size": 16}})
    cfg = config.load_config(Schema, defaults, [override], ["inner.ratio=0.9", "tags=[a,b]"])
    assert (cfg.name, cfg.inner.batch_size, cfg.inner.ratio, list(cfg.tags)) == ("base", 16, 0.9, ["a", "b"])


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match="inner.batchsize"):
        config.load_config(Schema, None, [], ["name=x", "inner.batchsize=3"])
    bad = write(tmp_path, "bad.yaml", {"name": "x", "inenr": {"batch_size": 1}})
    with pytest.raises(config.ConfigError, match=r"bad\.yaml.*inenr"):
        config.load_config(Schema, bad)


def test_config_errors_are_one_line_with_the_closest_valid_key(tmp_path):
    """OmegaConf appends ``full_key: ... reference_type=... object_type=...`` lines; the user sees one line that
    names the key by its full name and, for a misspelt key, the valid key it is closest to."""
    with pytest.raises(config.ConfigError) as unknown:
        config.load_config(Schema, None, [], ["name=x", "inner.batchsize=3"])
    assert str(unknown.value) == "command line: unknown key 'inner.batchsize'; did you mean 'inner.batch_size'?"
    bad = write(tmp_path, "bad.yaml", {"name": "x", "inenr": {"batch_size": 1}})
    with pytest.raises(config.ConfigError) as top:
        config.load_config(Schema, bad)
    assert str(top.value) == f"{bad}: unknown key 'inenr'; did you mean 'inner'?"
    with pytest.raises(config.ConfigError) as wrong_type:
        config.load_config(Schema, None, [], ["name=x", "inner.batch_size=lots"])
    message = str(wrong_type.value)
    assert "\n" not in message and "inner.batch_size" in message and "lots" in message
    assert not any(noise in message for noise in ("full_key", "reference_type", "object_type"))


def test_missing_required_value_is_named():
    with pytest.raises(config.ConfigError, match="name"):
        config.load_config(Schema)


def test_bad_cli_and_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="key=value"):
        config.load_config(Schema, None, [], ["+name=x"])
    with pytest.raises(config.ConfigError, match="not found"):
        config.load_config(Schema, tmp_path / "nope.yaml")
    with pytest.raises(config.ConfigError, match="unexpected argument"):
        config.split_cli(["name=x", "stray"])
    assert config.split_cli(["--config", "a.yaml", "--config=b.yaml", "k=v"]) == (["a.yaml", "b.yaml"], ["k=v"])


def test_saved_config_is_resolved_and_redacted(tmp_path):
    cfg = config.load_config(Schema, None, [], ["name=run", "storage.secret_access_key=hunter2",
                                                "storage.access_key_id=AKIAXXXX", "storage.region=eu-west-1"])
    uri = config.save_config(cfg, str(tmp_path / "run"))
    text = open(uri).read()
    assert "hunter2" not in text and "AKIAXXXX" not in text
    saved = yaml.safe_load(text)
    assert saved["storage"]["secret_access_key"] == "***" and saved["storage"]["region"] == "eu-west-1"
    assert saved["name"] == "run" and saved["inner"]["batch_size"] == 32


def test_curate_recipe_config_states_the_defaults():
    """recipes/configs/curate.yaml shows users the curation defaults; a value there that differs from the dataclass
    default silently overrides it for every recipe run (it once kept dedup at a retired threshold)."""
    import dataclasses
    import os

    from cytoray.curation.pipeline import CurateConfig

    path = os.path.join(os.path.dirname(__file__), "..", "recipes", "configs", "curate.yaml")
    with open(path) as fh:
        stated = yaml.safe_load(fh)
    differs, seen = [], 0

    def walk(node, obj, prefix):
        nonlocal seen
        for key, value in node.items():
            assert hasattr(obj, key), f"curate.yaml: unknown key {prefix}{key}"
            default = getattr(obj, key)
            if isinstance(value, dict) and dataclasses.is_dataclass(default):
                walk(value, default, f"{prefix}{key}.")
            else:
                seen += 1
                if value != default:
                    differs.append(f"{prefix}{key}: {value!r} in the file, {default!r} in the code")

    walk(stated, CurateConfig(), "")
    assert seen >= 10 and not differs, differs


def test_a_removed_key_says_why_and_what_to_do():
    from cytoray.curation.pipeline import CurateConfig

    with pytest.raises(config.ConfigError) as removed:
        config.load_config(CurateConfig, None, [], ["dedup.search_rows=131072"])
    assert str(removed.value) == ("command line: key 'dedup.search_rows' was removed: the near-duplicate search is a "
                                  "join over list partitions and has no query groups (docs/curation.md, 'Search "
                                  "and scale'); delete it")
