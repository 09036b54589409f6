import math

import pytest
import torch
import torch.nn.functional as F

from cytoray.platform.loss.cross_entropy import soft_cross_entropy
from cytoray.platform.loss.dino import DINOLoss, sinkhorn_knopp
from cytoray.platform.loss.distributed import all_reduce_sum, world_size
from cytoray.platform.loss.ibot import iBOTPatchLoss, mask_weights
from cytoray.platform.loss.koleo import koleo_loss


def test_sinkhorn_knopp_rows_and_columns():
    torch.manual_seed(0)
    b, k = 64, 16
    logits = torch.randn(b, k)
    q = sinkhorn_knopp(logits, temp=1.0, n_iterations=3)
    assert torch.allclose(q.sum(1), torch.ones(b), atol=1e-5)  # each sample: a distribution
    assert torch.allclose(q.sum(0), torch.full((k,), b / k), rtol=0.1)  # prototypes used evenly
    raw = torch.softmax(logits, -1).sum(0)
    assert (q.sum(0) - b / k).abs().max() < (raw - b / k).abs().max()  # more even than plain softmax
    more = sinkhorn_knopp(logits, temp=0.5, n_iterations=50)
    assert torch.allclose(more.sum(0), torch.full((k,), b / k), rtol=1e-3)


def test_sinkhorn_knopp_is_finite_for_huge_logits():
    q = sinkhorn_knopp(torch.tensor([[1000.0, 0.0], [0.0, 1000.0]]), temp=0.04)
    assert torch.isfinite(q).all()


def test_sinkhorn_knopp_leaves_its_input_alone():
    """The shift and exp work in place on the one fp32 buffer; fp32 input logits must not be that buffer."""
    logits = torch.randn(8, 16)
    before = logits.clone()
    sinkhorn_knopp(logits, temp=1.0)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_soft_cross_entropy_matches_log_softmax(chunk_rows):
    """Chunked (3 < 10 rows, and single rows) or not: loss and logits gradient equal the plain fp32 path."""
    torch.manual_seed(0)
    n, k, temp = 10, 256, 0.1
    logits = (torch.randn(n, k) * 3).requires_grad_()
    targets = torch.softmax(torch.randn(n, k) / 0.05, -1)
    g = torch.rand(n)
    plain = -(targets * F.log_softmax(logits / temp, dim=-1)).sum(-1)
    (plain * g).sum().backward()
    want = logits.grad.clone()
    logits.grad = None
    fused = soft_cross_entropy(logits, targets, temp, chunk_rows)
    (fused * g).sum().backward()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad, want, rtol=1e-5, atol=1e-5)  # gradients reach 1/τ: a few ulp


def test_soft_cross_entropy_keeps_bf16_logits_bf16():
    logits = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.softmax(torch.randn(6, 32), -1)
    ce = soft_cross_entropy(logits, targets, 0.1, 4)
    ce.sum().backward()
    assert ce.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    plain = -(targets * F.log_softmax(logits.float() / 0.1, dim=-1)).sum(-1)
    torch.testing.assert_close(ce, plain.detach(), rtol=1e-5, atol=1e-5)


def test_dino_loss_hand_checked():
    k = 8
    loss = DINOLoss(k, student_temp=0.1)
    uniform = torch.full((4, k), 1.0 / k)
    # uniform student (zero logits) vs uniform teacher: cross-entropy log K per pair, 2 students x 1 teacher
    assert math.isclose(loss([torch.zeros(4, k), torch.zeros(4, k)], [uniform]).item(), 2 * math.log(k), rel_tol=1e-6)
    onehot = torch.eye(k)[:4]
    confident = torch.eye(k)[:4] * 100  # student matches teacher: loss ~ 0
    assert loss([confident], [onehot]).item() < 1e-6


def test_dino_centering_is_an_ema_of_batch_means():
    loss = DINOLoss(3, center_momentum=0.9)
    loss.update_center(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    assert torch.allclose(loss.center, torch.tensor([[0.2, 0.2, 0.2]]))
    probs = loss.softmax_center_teacher(torch.tensor([[0.2, 0.2, 0.2]]), 0.04)
    assert torch.allclose(probs, torch.full((1, 3), 1 / 3))


def test_ibot_mask_weights_and_loss():
    masks = torch.tensor([[True, True, False, False], [True, False, False, False], [False] * 4])
    w = mask_weights(masks)
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 1.0]))  # each masked image weighs 1 in total
    k = 4
    loss = iBOTPatchLoss(k, student_temp=0.1)
    teacher = torch.full((3, k), 1 / k)
    value = loss.forward_masked(torch.zeros(3, k), teacher, masks)
    assert math.isclose(value.item(), 2 * math.log(k) / 3, rel_tol=1e-6)  # (2 images x log K) / B
    empty = loss.forward_masked(torch.zeros(0, k, requires_grad=True), torch.zeros(0, k), torch.zeros(2, 4, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_koleo_finite_on_duplicates_and_prefers_spread():
    x = torch.randn(8, 16)
    dup = torch.cat([x[:4], x[:4]]).requires_grad_(True)
    value = koleo_loss(dup, eps=1e-4)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(dup.grad).all()
    clustered = torch.randn(32, 16) * 0.01 + torch.ones(16)
    spread = torch.randn(32, 16)
    assert koleo_loss(clustered) > koleo_loss(spread)


def test_all_reduce_is_a_no_op_outside_distributed():
    x = torch.tensor([3.0])
    assert world_size() == 1 and all_reduce_sum(x) is x and x.item() == 3.0
