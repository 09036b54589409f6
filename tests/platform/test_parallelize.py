"""parallel.compile modes: the old boolean still reads, and compiling the whole model keeps the loss."""

import pytest
import torch

from cytoray.platform.config import load_preset
from cytoray.platform.objective import DINOv2Objective
from cytoray.platform.parallelize import apply_compile, compile_mode
from tests.platform.test_objective import _batch, _loss_and_grads


@pytest.mark.parametrize("value,mode", [(True, "blocks"), (False, "off"), ("True", "blocks"), ("false", "off"),
                                        ("model", "model"), ("blocks", "blocks"), ("off", "off")])
def test_compile_mode_accepts_old_booleans(value, mode):
    assert compile_mode(value) == mode


def test_compile_mode_names_the_choices():
    with pytest.raises(ValueError, match="off.*blocks.*model"):
        compile_mode("graphs")


@pytest.mark.slow  # inductor on CPU: ~2 min on 2 shared cores (3 backbone graphs + heads, forward and backward)
def test_whole_model_compile_keeps_loss_and_gradients():
    """parallel.compile=model on a tiny ViT (CPU inductor): the same loss, terms and student gradients as eager."""
    p = load_preset("debug", ["objective.out_dim=256", "objective.ibot_out_dim=256"])
    torch.manual_seed(0)
    eager = DINOv2Objective(p.vit, p.objective)
    compiled = DINOv2Objective(p.vit, p.objective)
    compiled.load_state_dict(eager.state_dict())
    apply_compile(compiled, "model")
    batch = _batch(p, n=4)
    try:
        loss, metrics, grads = _loss_and_grads(eager, batch)
        c_loss, c_metrics, c_grads = _loss_and_grads(compiled, batch)
    finally:
        torch._dynamo.reset()
    print(f"max |loss diff| {(c_loss - loss).abs().item():.2e}, max |grad diff| "
          f"{max((c_grads[n] - g).abs().max().item() for n, g in grads.items()):.2e}")
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-5)
    for key, value in metrics.items():
        torch.testing.assert_close(c_metrics[key], value, rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    for name, g in grads.items():  # inductor fuses and reorders reductions: gradient elements differ by ~1e-5
        torch.testing.assert_close(c_grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
