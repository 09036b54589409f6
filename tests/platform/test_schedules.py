import math

import numpy as np
import pytest
import torch

from cytoray.platform import schedules
from cytoray.platform.config import load_preset, make_schedules
from cytoray.platform.models.heads import DINOHead
from cytoray.platform.models.vit import ViTConfig, build_vit
from cytoray.platform.objective import DINOv2Objective, ObjectiveConfig


def test_cosine_schedule_known_points():
    s = schedules.cosine_schedule(1.0, 0.0, total_iters=110, warmup_iters=10, start_warmup=0.0)
    assert len(s) == 110 and s[0] == 0.0 and math.isclose(s[3], 1 / 3) and s[9] == 1.0  # warmup ends at base
    assert s[10] == 1.0 and math.isclose(s[60], 0.5) and s[-1] < 1e-3
    assert np.all(np.diff(s[10:]) <= 0)
    f = schedules.cosine_schedule(1.0, 0.0, 20, freeze_iters=5)
    assert (f[:5] == 0).all() and f[5] == 1.0
    with pytest.raises(ValueError, match="exceed"):
        schedules.cosine_schedule(1, 0, 10, warmup_iters=11)


def dinov2_cosine(base, final, total_iters, warmup_iters=0, start_warmup_value=0.0, freeze_iters=0):
    """DINOv2's ``CosineScheduler`` (dinov2/utils/utils.py), indexed as it is: past the end, the final value."""
    warmup = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(total_iters - warmup_iters - freeze_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters))) if len(iters) else iters
    schedule = np.concatenate((np.zeros(freeze_iters), warmup, cosine))
    return lambda it: final if it >= total_iters else schedule[it]


@pytest.mark.parametrize("base,final,total,warmup,start,freeze", [
    (1e-3, 1e-6, 100, 10, 0.0, 0), (0.04, 0.2, 50, 0, 0.0, 0), (0.994, 1.0, 37, 0, 0.0, 0),
    (5e-4, 1e-5, 60, 7, 1e-6, 5), (1.0, 0.0, 12, 12, 0.5, 0)])
def test_cosine_schedule_is_dinov2_element_wise(base, final, total, warmup, start, freeze):
    ours = schedules.cosine_schedule(base, final, total, warmup, start, freeze)
    ref = dinov2_cosine(base, final, total, warmup, start, freeze)
    assert np.array_equal(ours, [ref(i) for i in range(total)])


@pytest.mark.parametrize("warmup,total", [(30, 100), (30, 30), (40, 25), (1, 10), (0, 5)])
def test_teacher_temp_is_dinov2_element_wise(warmup, total):
    """dinov2/train/train.py: CosineScheduler(base=final=teacher_temp, total=warmup=warmup_teacher_temp_iters,
    start=warmup_teacher_temp), read past its end as teacher_temp."""
    ref = dinov2_cosine(0.07, 0.07, warmup, warmup, 0.04)
    assert np.array_equal(schedules.linear_warmup_constant(0.04, 0.07, warmup, total), [ref(i) for i in range(total)])


def test_teacher_temp_and_momentum_and_last_layer():
    s = schedules.build_schedules(100, lr=1e-3, min_lr=1e-6, warmup_iters=10, wd=0.04, wd_end=0.2, momentum=0.994,
                                  momentum_end=1.0, teacher_temp=0.07, warmup_teacher_temp=0.04,
                                  teacher_temp_warmup_iters=30, freeze_last_layer_iters=5)
    assert math.isclose(s.teacher_temp[0], 0.04) and math.isclose(s.teacher_temp[29], 0.07)  # reached at the end
    assert math.isclose(s.teacher_temp[10], 0.04 + 0.03 * 10 / 29) and (s.teacher_temp[29:] == s.teacher_temp[29]).all()
    assert math.isclose(s.momentum[0], 0.994) and s.momentum[-1] > 0.9999
    assert math.isclose(s.wd[0], 0.04) and s.wd[-1] > 0.199
    assert (s.last_layer_lr[:5] == 0).all() and s.last_layer_lr[5] == s.lr[5]
    assert s.at(10_000)["lr"] == s.lr[-1]  # clamped past the end


def test_lr_scaling_rule():
    assert math.isclose(schedules.scaled_lr(2e-4, 1024), 2e-4)
    assert math.isclose(schedules.scaled_lr(2e-4, 4096), 4e-4)
    assert math.isclose(schedules.scaled_lr(5e-4, 512, "linear_wrt_256"), 1e-3)
    with pytest.raises(ValueError):
        schedules.scaled_lr(1, 1, "cubic")


def test_param_groups_decay_multipliers_and_no_weight_decay():
    model = torch.nn.ModuleDict({"backbone": build_vit(arch="vit_debug", patch_size=8, img_size=32),
                                 "dino_head": DINOHead(64, 32, 32, 16)})
    groups = schedules.param_groups(model, num_layers=2, layer_decay=0.5, patch_embed_lr_mult=0.2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == 0.25  # 0.5 ** (2 + 1 - 1)
    assert by_name["backbone.blocks.1.attn.qkv.weight"]["lr_multiplier"] == 0.5
    assert math.isclose(by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"], 0.125 * 0.2)
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    for name in ("backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.ls1.gamma",
                 "backbone.norm.weight"):
        assert by_name[name]["wd_multiplier"] == 0.0, name
    assert by_name["backbone.blocks.0.mlp.fc1.weight"]["wd_multiplier"] == 1.0
    assert by_name["backbone.cls_token"]["wd_multiplier"] == 1.0  # DINOv2 decays tokens and pos_embed
    assert by_name["dino_head.last_layer.weight_v"]["is_last_layer"]
    opt = torch.optim.AdamW(groups)
    schedules.apply_schedule(opt, {"lr": 1.0, "wd": 0.1, "last_layer_lr": 0.0})
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else g["lr_multiplier"])
        assert g["weight_decay"] == 0.1 * g["wd_multiplier"]


def test_prototype_weight_g_trains_by_default_and_freezes_on_request():
    """DINOv2 trains the weight-norm gain (weight_norm(nn.Linear), g filled with 1) in the last-layer group with
    weight decay (its name has no bias/norm/gamma); ``head_freeze_weight_g`` keeps DINO v1's g = 1."""
    torch.manual_seed(0)
    trained, frozen = DINOHead(64, 32, 32, 16), DINOHead(64, 32, 32, 16, freeze_weight_g=True)
    for head in (trained, frozen):
        head(torch.randn(8, 64)).logsumexp(-1).sum().backward()
    assert torch.equal(trained.last_layer.weight_g, torch.ones(32, 1))
    assert trained.last_layer.weight_g.grad is not None and trained.last_layer.weight_g.grad.abs().sum() > 0
    assert not frozen.last_layer.weight_g.requires_grad and frozen.last_layer.weight_g.grad is None
    groups = schedules.param_groups(torch.nn.ModuleDict({"dino_head": trained}), num_layers=2)
    g = next(g for g in groups if "dino_head.last_layer.weight_g" in g["names"])
    assert g["is_last_layer"] and g["wd_multiplier"] == 1.0 and g["lr_multiplier"] == 1.0
    assert "dino_head.last_layer.weight_g" not in {n for g in schedules.param_groups(
        torch.nn.ModuleDict({"dino_head": frozen}), num_layers=2) for n in g["names"]}
    vit = ViTConfig(arch="vit_debug", patch_size=8, img_size=32)
    small = {"out_dim": 32, "ibot_out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
             "ibot_separate_head": True}
    for freeze in (False, True):
        obj = DINOv2Objective(vit, ObjectiveConfig(**small, head_freeze_weight_g=freeze))
        assert [obj.student[h].last_layer.weight_g.requires_grad for h in ("dino_head", "ibot_head")] == [not freeze] * 2


@pytest.mark.parametrize("name,arch", [("dinobloom_s", "vit_small"), ("dinobloom_b", "vit_base"),
                                       ("dinobloom_l", "vit_large"), ("dinobloom_g", "vit_giant2"),
                                       ("debug", "vit_debug")])
def test_presets_load_with_published_hyperparameters(name, arch):
    p = load_preset(name)
    assert p.vit.arch == arch
    if name != "debug":
        assert (p.objective.out_dim, p.objective.koleo_loss_weight, p.optim.base_lr) == (65536, 0.1, 2e-4)
        assert (p.optim.weight_decay, p.optim.weight_decay_end) == (0.04, 0.2)
        assert (p.optim.momentum_teacher, p.optim.teacher_temp, p.optim.warmup_teacher_temp) == (0.994, 0.07, 0.04)
        assert tuple(p.mask.mask_ratio) == (0.1, 0.5) and p.mask.mask_probability == 0.5
        assert p.augment.global_crops.size == 224 and tuple(p.augment.global_crops.scale) == (0.32, 1.0)
        assert (p.optim.layer_decay, p.optim.patch_embed_lr_mult, p.optim.clip_grad) == (1.0, 0.2, 3.0)
        assert p.augment.second_global_solarize_p == 0.0
        s = make_schedules(p, total_batch_size=2048)
        assert math.isclose(s.lr.max(), 2e-4 * math.sqrt(2))


def test_preset_overrides_and_unknown_preset():
    from cytoray.config import ConfigError

    p = load_preset("debug", ["vit.num_register_tokens=4", "augment.local_crops.number=0"])
    assert p.vit.num_register_tokens == 4 and p.augment.local_crops.number == 0
    with pytest.raises(ConfigError, match="available"):
        load_preset("dinobloom_xl")


def test_a_short_run_says_its_schedules_run_on_and_the_switch_fits_them_to_max_steps():
    """train.max_steps=40 on the debug preset (total_iters 300) stopped with the lr near its peak and said nothing
    (issue 31): the launch line says so and how to fix it; train.schedule_to_max_steps=true gives every schedule
    max_steps steps, warm-up and decay included."""
    from cytoray.platform.config import TrainConfig, schedule_length, short_run_notice

    p = load_preset("debug")
    short = TrainConfig(max_steps=40)
    notice = short_run_notice(p, short)
    assert "\n" not in notice and "train.max_steps=40" in notice and "model.total_iters=300" in notice
    assert "train.schedule_to_max_steps=true" in notice and "lr is at 99% of its peak" in notice
    assert schedule_length(p, short) == 300
    assert short_run_notice(p, TrainConfig()) is None and short_run_notice(p, TrainConfig(max_steps=300)) is None

    fitted = TrainConfig(max_steps=40, schedule_to_max_steps=True)
    assert short_run_notice(p, fitted) is None and schedule_length(p, fitted) == 40
    s = make_schedules(p, 64, schedule_length(p, fitted))
    assert {len(v) for v in vars(s).values()} == {40}
    full = make_schedules(p, 64)
    # the same shape compressed: warm-up 20 of 300 -> 3 of 40, peak lr the same, the end at min_lr as in the full run
    assert int(np.argmax(s.lr)) == 2 and s.lr.max() == full.lr.max()
    assert s.lr[-1] < 0.01 * s.lr.max() and full.lr[39] > 0.9 * full.lr.max()
    assert s.momentum[-1] == pytest.approx(full.momentum[-1], abs=1e-4)
    assert schedule_length(p, TrainConfig(schedule_to_max_steps=True)) == 300  # no max_steps: the whole preset
