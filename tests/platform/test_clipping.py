"""Gradient clipping per student part (DINOv2's rule) or on one joint norm, on tiny modules with set gradients."""

import math

import pytest
import torch
from torch import nn

from cytoray.platform.step import clip_gradients


def _parts(backbone_norm: float, head_norm: float) -> dict[str, nn.Module]:
    """Two parts whose gradients have the given L2 norms (3-4-5 rows scaled)."""
    parts = {"backbone": nn.Linear(2, 1, bias=False), "dino_head": nn.Linear(2, 1, bias=False)}
    for module, norm in ((parts["backbone"], backbone_norm), (parts["dino_head"], head_norm)):
        module.weight.grad = torch.tensor([[0.6, 0.8]]) * norm
    return parts


def _norm(module: nn.Module) -> float:
    return float(torch.linalg.vector_norm(module.weight.grad))


def test_submodule_scope_clips_each_part_on_its_own_norm():
    parts = _parts(18.0, 87.5)  # the step-0 norms of issue 30: head several times the backbone
    out = clip_gradients(parts, 3.0, "submodule")
    assert out["grad_norm_backbone"] == pytest.approx(18.0) and out["grad_norm_dino_head"] == pytest.approx(87.5)
    assert out["grad_norm"] == pytest.approx(math.hypot(18.0, 87.5))  # logged before clipping
    assert _norm(parts["backbone"]) == pytest.approx(3.0, rel=1e-5)  # each at the limit, not 18 / 89 * 3
    assert _norm(parts["dino_head"]) == pytest.approx(3.0, rel=1e-5)
    assert out["grad_clipped_backbone"] == out["grad_clipped_dino_head"] == 1.0


def test_submodule_scope_leaves_a_part_under_the_limit_untouched():
    parts = _parts(1.5, 87.5)
    before = parts["backbone"].weight.grad.clone()
    out = clip_gradients(parts, 3.0, "submodule")
    assert torch.equal(parts["backbone"].weight.grad, before)
    assert _norm(parts["dino_head"]) == pytest.approx(3.0, rel=1e-5)
    assert (out["grad_clipped_backbone"], out["grad_clipped_dino_head"]) == (0.0, 1.0)


def test_global_scope_scales_every_part_by_the_joint_norm():
    parts = _parts(1.5, 87.5)
    out = clip_gradients(parts, 3.0, "global")
    joint = math.hypot(1.5, 87.5)
    assert _norm(parts["backbone"]) == pytest.approx(1.5 * 3.0 / joint, rel=1e-5)  # shrunk with the head's
    assert math.hypot(_norm(parts["backbone"]), _norm(parts["dino_head"])) == pytest.approx(3.0, rel=1e-5)
    assert out["grad_clipped_backbone"] == out["grad_clipped_dino_head"] == 1.0
    # the same as PyTorch's clip over all parameters
    expected = _parts(1.5, 87.5)
    torch.nn.utils.clip_grad_norm_([p for m in expected.values() for p in m.parameters()], 3.0)
    for got, want in zip(parts.values(), expected.values()):
        torch.testing.assert_close(got.weight.grad, want.weight.grad)


def test_zero_limit_logs_norms_and_clips_nothing_and_a_bad_scope_is_named():
    parts = _parts(18.0, 87.5)
    out = clip_gradients(parts, 0.0, "submodule")
    assert _norm(parts["backbone"]) == pytest.approx(18.0) and out["grad_clipped_dino_head"] == 0.0
    parts["backbone"].weight.grad = None  # a part without gradients (e.g. a loss term switched off)
    assert clip_gradients(parts, 3.0)["grad_norm_backbone"] == 0.0
    with pytest.raises(ValueError, match="optim.clip_scope must be one of"):
        clip_gradients(parts, 3.0, "per_layer")
