"""Packed crops (``forward_features_list``, ``objective.pack_crops``): one backbone pass over global and local
crops gives what separate passes give — features, loss and gradients — in fp32 on CPU."""

import numpy as np
import pytest
import torch

from cytoray.platform.config import load_preset
from cytoray.platform.data.keys import block_masks, drop_noise
from cytoray.platform.data.masking import MaskingGenerator
from cytoray.platform.models.vit import build_vit
from cytoray.platform.objective import DINOv2Objective

TOL = 1e-5
KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item() if a.numel() else 0.0


def _inputs(p, b=4):
    """Crops, iBOT masks and stochastic-depth uniforms at the debug preset's sizes (2 x 64 + 2 x 32, /8)."""
    g, loc = p.augment.global_crops, p.augment.local_crops
    grid = (g.size // p.vit.patch_size,) * 2
    batch = {"global_crops": torch.randn(g.number, b, 3, g.size, g.size),
             "local_crops": torch.randn(loc.number, b, 3, loc.size, loc.size)}
    batch.update(block_masks(0, 0, np.arange(b), np.arange(b), g.number, b, grid, (0.1, 0.5), 1.0,
                             MaskingGenerator(grid)))
    depth = {"vit_debug": 2}[p.vit.arch]
    batch.update(drop_noise(0, np.arange(b), g.number, loc.number, depth))
    return batch


@pytest.mark.parametrize("overrides", [
    [],
    ["vit.num_register_tokens=2", "vit.drop_path_rate=0.3"],
    ["vit.drop_path_rate=0.5", "vit.drop_path_uniform=false", "vit.layerscale=0"],
])
def test_packed_features_equal_separate_passes(overrides):
    torch.manual_seed(0)
    p = load_preset("debug", overrides)
    vit = build_vit(p.vit).train()
    batch = _inputs(p)
    globals_, locals_ = batch["global_crops"].flatten(0, 1), batch["local_crops"].flatten(0, 1)
    noise_g, noise_l = batch["drop_noise_global"], batch["drop_noise_local"]
    assert batch["masks"].any()
    separate = [vit.forward_features(globals_, masks=batch["masks"], drop_noise=noise_g),
                vit.forward_features(locals_, drop_noise=noise_l)]
    packed = vit.forward_features_list([globals_, locals_], [batch["masks"], None], [noise_g, noise_l])
    diffs = {k: max(_max_diff(s[k], q[k]) for s, q in zip(separate, packed)) for k in KEYS}
    assert max(diffs.values()) < TOL, diffs
    assert packed[0]["masks"] is batch["masks"] and packed[1]["masks"] is None
    if p.vit.drop_path_rate:  # stochastic depth really acts: other uniforms give other features
        other = vit.forward_features_list([globals_, locals_], [batch["masks"], None], [1 - noise_g, 1 - noise_l])
        assert _max_diff(other[0]["x_prenorm"], packed[0]["x_prenorm"]) > 1e-3


@pytest.mark.parametrize("overrides", [
    [],
    ["vit.num_register_tokens=2", "vit.drop_path_rate=0.3", "objective.ibot_separate_head=true"],
])
def test_pack_crops_gives_the_same_loss_and_gradients(overrides):
    p = load_preset("debug", overrides)
    batch = _inputs(p)
    results = []
    for pack in (False, True):
        torch.manual_seed(0)
        p.objective.pack_crops = pack
        obj = DINOv2Objective(p.vit, p.objective)
        loss, metrics = obj(batch, teacher_temp=0.04)
        loss.backward()
        results.append((loss, metrics, dict(obj.student.named_parameters())))
    (loss0, m0, params0), (loss1, m1, params1) = results
    assert abs(loss0.item() - loss1.item()) < TOL * max(1.0, abs(loss0.item()))
    assert all(abs(m0[k].item() - m1[k].item()) < TOL for k in m0), {k: (m0[k], m1[k]) for k in m0}
    names = ["backbone.cls_token", "backbone.pos_embed", "backbone.mask_token", "backbone.patch_embed.proj.weight",
             "backbone.blocks.0.attn.qkv.weight", "backbone.blocks.1.mlp.fc2.weight", "backbone.blocks.1.ls2.gamma",
             "backbone.norm.weight", "dino_head.last_layer.weight_v"]
    if p.vit.num_register_tokens:
        names.append("backbone.register_tokens")
    for name in names:
        g0, g1 = params0[name].grad, params1[name].grad
        assert g0 is not None and g0.abs().max() > 0, name
        scale = max(1.0, g0.abs().max().item())
        assert _max_diff(g0, g1) < TOL * scale, (name, _max_diff(g0, g1))


def test_pack_crops_under_fsdp_equals_one_process():
    """FSDP2 (one gloo rank, as training wraps it) around the packed pass: ``forward_features_list`` is
    registered as a forward method, so the step matches the unpacked step of one plain process."""
    from cytoray.platform.rank_equivalence import run_step
    from tests.platform.test_rank_equivalence import _assert_same

    base = ["vit.num_register_tokens=2", "vit.drop_path_rate=0.2"]
    (ref,), (got,) = run_step(0, [base]), run_step(1, [base + ["objective.pack_crops=true"]])
    _assert_same(got, ref, "pack_crops under FSDP")
