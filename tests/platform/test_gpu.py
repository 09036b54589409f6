"""GPU smoke tests (``-m gpu``; skipped cleanly without CUDA): one FSDP2 bf16 step of the real objective, and
xformers vs SDPA attention. Torch only — no Ray, OmegaConf or faiss — so they run on a bare GPU image."""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fsdp2_bf16_step_of_the_objective_on_cuda():
    import numpy as np
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from cytoray.platform.data.batch import SampleDraws
    from cytoray.platform.models.vit import ViTConfig
    from cytoray.platform.objective import DINOv2Objective, ObjectiveConfig
    from cytoray.platform.parallelize import ParallelConfig, apply_fsdp
    from cytoray.platform.step import build_optimizer, train_step

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        torch.manual_seed(0)
        vit = ViTConfig(arch="vit_small", patch_size=14, img_size=224, drop_path_rate=0.1, num_register_tokens=4)
        objective = DINOv2Objective(vit, ObjectiveConfig(out_dim=4096, ibot_out_dim=4096)).to(device)
        apply_fsdp(objective, init_device_mesh("cuda", (1,)), ParallelConfig(mixed_precision="bf16"))
        optimizer = build_optimizer(objective, 0.9, 0.2)
        b = 8
        batch = {"global_crops": torch.randn(2, b, 3, 224, 224), "local_crops": torch.randn(4, b, 3, 98, 98)}
        positions = np.arange(b)
        batch.update(SampleDraws(224, 14, depth=12, drop_path_rate=0.1)(0, 0, positions, positions, b, 2, 4))
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        before = [p.detach().full_tensor().clone() for p in objective.student.parameters()]
        values = {"lr": 1e-4, "wd": 0.04, "momentum": 0.99, "teacher_temp": 0.04, "last_layer_lr": 1e-4}
        metrics = train_step(objective, optimizer, batch, values, clip_grad=3.0, step=0)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        assert metrics["ibot_loss"] > 0 and metrics["grad_norm"] > 0
        after = [p.detach().full_tensor() for p in objective.student.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
        assert all(p.dtype == torch.float32 for p in objective.student.parameters())  # fp32 master weights
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_xformers_and_sdpa_attention_agree():
    from cytoray.platform.models.layers import Attention, xformers_available

    if not xformers_available():
        pytest.skip("xformers is not installed")
    torch.manual_seed(0)
    sdpa = Attention(384, 6, attn_impl="sdpa").cuda()
    xf = Attention(384, 6, attn_impl="xformers").cuda()
    xf.load_state_dict(sdpa.state_dict())
    x = torch.randn(4, 261, 384, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(xf(x), sdpa(x), rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.testing.assert_close(xf(x).float(), sdpa(x).float(), rtol=2e-2, atol=2e-2)
