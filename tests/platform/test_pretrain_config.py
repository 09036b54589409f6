"""Pretraining config layering: preset under `model`, recipe default, --config files, key=value."""

import pytest

from cytoray.config import ConfigError
from cytoray.platform.config import chosen_preset, load_pretrain_config, preset_replaced


def test_recipe_preset_and_its_overrides(tmp_path):
    c = load_pretrain_config(["run.name=a", "data.manifest_uri=m"], preset="dinobloom_l")
    assert c.preset == "dinobloom_l" and c.model.vit.arch == "vit_large" and c.model.objective.out_dim == 65536
    # preset=... on the command line replaces the recipe's preset before the other overrides apply
    c = load_pretrain_config(["preset=debug", "model.vit.layerscale=0.5", "run.name=a", "data.manifest_uri=m"],
                             preset="dinobloom_l")
    assert c.model.vit.arch == "vit_debug" and c.model.vit.layerscale == 0.5
    # a --config file can pick the preset too (recipes/configs/cpu_debug.yaml does)
    f = tmp_path / "o.yaml"
    f.write_text("preset: dinobloom_s\ntrain: {num_workers: 3}\n")
    c = load_pretrain_config(["--config", str(f), "run.name=a", "data.manifest_uri=m"], preset="dinobloom_l")
    assert c.model.vit.arch == "vit_small" and c.train.num_workers == 3


def test_free_form_dicts_open_schema_closed():
    c = load_pretrain_config(["run.name=a", "data.manifest_uri=m", "data.label_selector.cytoray-role=data"],
                             preset="debug")
    assert dict(c.data.label_selector) == {"cytoray-role": "data"}
    with pytest.raises(ConfigError, match="data.bogus"):
        load_pretrain_config(["run.name=a", "data.manifest_uri=m", "data.bogus=1"], preset="debug")
    with pytest.raises(ConfigError, match="train.num_workers"):
        load_pretrain_config(["run.name=a", "data.manifest_uri=m", "train.num_workers=many"], preset="debug")
    with pytest.raises(ConfigError, match="run.name"):
        load_pretrain_config(["data.manifest_uri=m"], preset="debug")


def test_elastic_worker_range_needs_a_global_batch_every_count_divides():
    from cytoray.platform.config import global_batch, per_worker_batch, worker_range

    def cfg(*overrides):
        return load_pretrain_config(["run.name=a", "data.manifest_uri=m", *overrides], preset="debug")

    c = cfg("train.num_workers=[1,2]", "model.global_batch_size=4")
    assert worker_range(c.train) == (1, 2) and global_batch(c.model, c.train) == 4
    assert [per_worker_batch(c.model, c.train, n) for n in (1, 2)] == [4, 2]
    fixed = cfg("train.num_workers=3", "model.batch_size_per_device=5")
    assert global_batch(fixed.model, fixed.train) == 15 and per_worker_batch(fixed.model, fixed.train, 3) == 5
    with pytest.raises(ConfigError, match="needs model.global_batch_size"):
        global_batch(cfg("train.num_workers=[1,2]").model, cfg("train.num_workers=[1,2]").train)
    c = cfg("train.num_workers=[2,4]", "model.global_batch_size=8")
    with pytest.raises(ConfigError, match=r"not divisible by \[3\]"):
        global_batch(c.model, c.train)
    with pytest.raises(ConfigError, match="1 <= min <= max"):
        cfg("train.num_workers=[3,2]")


def test_a_preset_script_warns_in_one_line_when_a_config_replaces_its_preset():
    """`recipes/pretrain_vitl.py --config cpu_debug.yaml` trains the debug preset (tests/test_job_submit.py runs it so); it
    used to do so silently although the script stands for dinobloom_l. The warning names both presets, where the
    other came from and the recipe for it."""
    import os

    debug = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "configs", "cpu_debug.yaml")
    chosen = chosen_preset(["--config", debug, "run.name=a"], "dinobloom_l")
    assert chosen == ("debug", debug)
    line = preset_replaced("recipes/pretrain_vitl.py", "dinobloom_l", *chosen)
    assert "\n" not in line and line.startswith("recipes/pretrain_vitl.py stands for preset dinobloom_l")
    assert f"preset=debug from {debug}" in line and "python recipes/pretrain.py" in line
    # the command line wins over a file; naming the script's own preset, or none, is no warning
    assert chosen_preset(["--config", debug, "preset=dinobloom_s"], "dinobloom_l") == ("dinobloom_s", "the command line")
    assert preset_replaced("recipes/pretrain_vitl.py", "dinobloom_l",
                           *chosen_preset(["preset=dinobloom_l"], "dinobloom_l")) is None
    assert chosen_preset(["run.name=a"], "dinobloom_l") == ("dinobloom_l", None)
