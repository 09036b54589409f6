"""The objective's variants on one small batch: finite losses, the right terms, gradients only on the student."""

import math

import numpy as np
import pytest
import torch

from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain, render_cell
from cytoray.platform.config import load_preset
from cytoray.platform.data.augment import MultiCrop
from cytoray.platform.data.batch import BatchBuilder
from cytoray.platform.objective import DINOv2Objective


def _batch(p, n=6):
    rng = np.random.default_rng(0)
    images = [render_cell(CLASS_NAMES[i % 10], 80, 0.3, Stain(), rng) for i in range(n)]
    return BatchBuilder(MultiCrop(p.augment), p.vit.patch_size, p.mask.mask_ratio, 1.0)(images, seed=0)


@pytest.mark.parametrize("overrides,terms", [
    ([], {"dino_local_loss", "dino_global_loss", "koleo_loss", "ibot_loss"}),
    (["objective.ibot_separate_head=true"], {"dino_local_loss", "dino_global_loss", "koleo_loss", "ibot_loss"}),
    (["objective.centering=centering"], {"dino_local_loss", "dino_global_loss", "koleo_loss", "ibot_loss"}),
    (["augment.local_crops.number=0"], {"dino_global_loss", "koleo_loss", "ibot_loss"}),
    (["objective.koleo_loss_weight=0", "objective.ibot_loss_weight=0"], {"dino_local_loss", "dino_global_loss"}),
])
def test_objective_variants(overrides, terms):
    torch.manual_seed(0)
    p = load_preset("debug", overrides)
    obj = DINOv2Objective(p.vit, p.objective)
    batch = _batch(p)
    loss, metrics = obj(batch, teacher_temp=0.04)
    assert math.isfinite(loss.item())
    assert terms <= set(metrics) and not ({"dino_local_loss", "koleo_loss", "ibot_loss"} - terms) & set(metrics)
    expected = sum(w * metrics[k].item() for k, w in [("dino_local_loss", 1.0), ("dino_global_loss", 1.0),
                                                       ("koleo_loss", p.objective.koleo_loss_weight),
                                                       ("ibot_loss", p.objective.ibot_loss_weight)] if k in metrics)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    monitors = {"teacher_entropy", "prototype_usage", "teacher_logit_std", "teacher_feature_std", "student_feature_std"}
    assert monitors <= set(metrics) and ("teacher_center_norm" in metrics) == ("objective.centering=centering" in overrides)
    assert 0 < metrics["teacher_entropy"] <= math.log(p.objective.out_dim) + 1e-4
    assert 0 < metrics["prototype_usage"] <= 1 and metrics["teacher_feature_std"] > 0
    loss.backward()
    assert any(q.grad is not None for q in obj.student.parameters())
    assert all(q.grad is None for q in obj.teacher.parameters())
    if "ibot_separate_head=true" in " ".join(overrides):
        assert "ibot_head" in obj.student and obj.student["ibot_head"].last_layer.weight_v.grad is not None
    if "centering=centering" in " ".join(overrides):
        assert obj.dino_loss.center.abs().sum() > 0  # EMA centre moved


def test_uniform_teacher_gives_log_k_dino_terms():
    """With a collapsed (uniform) teacher and a uniform student every pair costs log K — the weighting
    across pairs then gives exactly log K for local + global together (DINOv2's normalisation)."""
    p = load_preset("debug", ["objective.koleo_loss_weight=0", "objective.ibot_loss_weight=0"])
    obj = DINOv2Objective(p.vit, p.objective)
    for head in (obj.student["dino_head"], obj.teacher["dino_head"]):
        torch.nn.init.zeros_(head.last_layer.weight_v)
        head.last_layer.weight_v.data[:, 0] = 1.0  # every prototype identical -> uniform logits
    _, metrics = obj(_batch(p), teacher_temp=0.04)
    total = metrics["dino_local_loss"].item() + metrics["dino_global_loss"].item()
    assert math.isclose(total, math.log(p.objective.out_dim), rel_tol=1e-4)
    # the collapse monitors read it: uniform targets, no logit spread, one argmax prototype for the 2 x 6 rows
    assert math.isclose(metrics["teacher_entropy"].item(), math.log(p.objective.out_dim), rel_tol=1e-4)
    assert metrics["teacher_logit_std"].item() < 1e-6 and math.isclose(metrics["prototype_usage"].item(), 1 / 12)


def test_mfu_flops_estimate_matches_a_counted_step():
    """The progress line's MFU uses a meta-device FLOPs estimate; a whole step counted on real tensors agrees."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cytoray.platform.data.keys import block_masks
    from cytoray.platform.data.masking import MaskingGenerator
    from cytoray.platform.flops import train_flops_per_image
    from cytoray.platform.models.vit import ViTConfig

    p = load_preset("debug")  # vit_debug /8, crops 2 x 64 + 2 x 32
    torch.manual_seed(0)
    obj = DINOv2Objective(p.vit, p.objective)
    b, g, loc = 16, p.augment.global_crops, p.augment.local_crops
    grid = (g.size // p.vit.patch_size,) * 2
    batch = {"global_crops": torch.randn(g.number, b, 3, g.size, g.size),
             "local_crops": torch.randn(loc.number, b, 3, loc.size, loc.size)}
    batch.update(block_masks(0, 0, np.arange(b), np.arange(b), g.number, b, grid, p.mask.mask_ratio,
                             p.mask.mask_probability, MaskingGenerator(grid)))
    # the math SDPA path: the counter does not see the fused CPU attention kernel's FLOPs
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = obj(batch, 0.07)
        loss.backward()
    counted = counter.get_total_flops() / b
    estimate = train_flops_per_image(ViTConfig(**vars(p.vit)), p.objective, p.augment, p.mask)
    assert 0.95 < estimate / counted < 1.05, (estimate, counted)


def _loss_and_grads(obj, batch):
    loss, metrics = obj(batch, teacher_temp=0.04)
    loss.backward()
    grads = {k: q.grad.clone() for k, q in obj.student.named_parameters() if q.grad is not None}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("overrides", [[], ["objective.centering=centering", "objective.ibot_separate_head=true"]])
def test_fused_loss_matches_plain(overrides):
    """objective.fused_loss (chunked cross-entropy, 5 rows per chunk < 12 global-CLS rows and the masked patches):
    loss, every term and every student gradient as the plain path, fp32, within 1e-5."""
    common = ["objective.out_dim=256", "objective.ibot_out_dim=256", *overrides]
    p = load_preset("debug", common)
    torch.manual_seed(0)
    plain = DINOv2Objective(p.vit, p.objective)
    fused = DINOv2Objective(p.vit, load_preset("debug", [*common, "objective.fused_loss=true",
                                                         "objective.fused_loss_chunk_rows=5"]).objective)
    fused.load_state_dict(plain.state_dict())
    batch = _batch(p)
    assert batch["mask_indices"].numel() > 5  # iBOT rows span several chunks
    loss, metrics, grads = _loss_and_grads(plain, batch)
    f_loss, f_metrics, f_grads = _loss_and_grads(fused, batch)
    print(f"max |loss diff| {(f_loss - loss).abs().item():.2e}, max |grad diff| "
          f"{max((f_grads[n] - g).abs().max().item() for n, g in grads.items()):.2e}")
    torch.testing.assert_close(f_loss, loss, rtol=1e-5, atol=1e-5)
    for key, value in metrics.items():
        torch.testing.assert_close(f_metrics[key], value, rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    assert f_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(f_grads[name], g, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
