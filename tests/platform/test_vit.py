import pytest
import torch

from cytoray.platform.models import checkpoints as ck
from cytoray.platform.models.vit import ARCHS, build_vit, resize_pos_embed

# Parameter counts of the public DINOv2 backbones (millions): ViT-S/14 22M, B 86M, L 304M, g 1.1B.
EXPECTED_PARAMS_M = {"vit_small": 22.1, "vit_base": 86.6, "vit_large": 304.4, "vit_giant2": 1136.5}


def expected_shapes(arch: str, grid: int = 37, registers: int = 0) -> dict:
    """The DINOv2 hub layout, written out independently of the model code."""
    d, depth, _, ffn = ARCHS[arch]
    s = {"cls_token": (1, 1, d), "pos_embed": (1, grid * grid + 1, d), "mask_token": (1, d),
         "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,), "norm.weight": (d,),
         "norm.bias": (d,)}
    if registers:
        s["register_tokens"] = (1, registers, d)
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                  b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                  b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "ls2.gamma": (d,)})
        if ffn == "swiglu":
            h = 4096  # SwiGLUFFNFused hidden for ViT-g: (int(4*1536*2/3)+7)//8*8
            s.update({b + "mlp.w12.weight": (2 * h, d), b + "mlp.w12.bias": (2 * h,), b + "mlp.w3.weight": (d, h),
                      b + "mlp.w3.bias": (d,)})
        else:
            s.update({b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d),
                      b + "mlp.fc2.bias": (d,)})
    return s


@pytest.mark.parametrize("arch", ["vit_small", "vit_base", "vit_large", "vit_giant2"])
def test_state_dict_matches_dinov2_layout_on_meta_device(arch):
    with torch.device("meta"):
        model = build_vit(arch=arch, img_size=518, num_register_tokens=4 if arch == "vit_large" else 0)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(arch, 37, 4 if arch == "vit_large" else 0)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - EXPECTED_PARAMS_M[arch]) / EXPECTED_PARAMS_M[arch] < 0.02, n


def test_forward_features_shapes_registers_and_masks():
    torch.manual_seed(0)
    m = build_vit(arch="vit_debug", patch_size=8, img_size=64, num_register_tokens=2).eval()
    x = torch.randn(3, 3, 64, 48)  # non-square: pos_embed interpolated
    out = m.forward_features(x)
    assert out["x_norm_clstoken"].shape == (3, 64)
    assert out["x_norm_regtokens"].shape == (3, 2, 64)
    assert out["x_norm_patchtokens"].shape == (3, 8 * 6, 64)
    masks = torch.zeros(3, 48, dtype=torch.bool)
    masks[0, :10] = True
    masked = m.forward_features(x, masks=masks)
    assert not torch.allclose(masked["x_norm_clstoken"][0], out["x_norm_clstoken"][0])
    assert torch.allclose(masked["x_norm_clstoken"][1:], out["x_norm_clstoken"][1:], atol=1e-6)
    layers = m.get_intermediate_layers(torch.randn(2, 3, 64, 64), n=2, reshape=True, return_class_token=True)
    assert len(layers) == 2 and layers[0][0].shape == (2, 64, 8, 8) and layers[0][1].shape == (2, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 3, 60, 64))


def test_xformers_switch_falls_back_to_sdpa_on_cpu_with_same_outputs():
    torch.manual_seed(0)
    a = build_vit(arch="vit_debug", patch_size=8, img_size=32).eval()
    b = build_vit(arch="vit_debug", patch_size=8, img_size=32, attn_impl="xformers").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(a(x), b(x), atol=1e-6)


def test_resize_pos_embed():
    d = 8
    ramp = torch.linspace(0, 1, 37).view(37, 1, 1).expand(37, 37, d)  # smooth along rows
    pe = torch.cat([torch.full((1, 1, d), 7.0), ramp.reshape(1, 37 * 37, d)], dim=1)
    out = resize_pos_embed(pe, (16, 16), interpolate_offset=0.0)
    assert out.shape == (1, 257, d)
    assert torch.equal(out[:, 0], pe[:, 0])  # CLS position untouched
    rows = out[0, 1:, 0].view(16, 16)
    assert torch.all(rows[1:] > rows[:-1]) and torch.allclose(rows[:, 0], rows[:, 5])  # ramp preserved
    m = build_vit(arch="vit_debug", patch_size=14, img_size=224)
    assert m.interpolate_pos_encoding(256, 224, 224) is m.pos_embed  # stored grid: no resampling
    assert m.interpolate_pos_encoding(37 * 37, 518, 518).shape == (1, 37 * 37 + 1, 64)
    out2 = resize_pos_embed(pe, (16, 16), interpolate_offset=0.1, antialias=True)
    assert out2.shape == (1, 257, d)


def _model(**kw):
    torch.manual_seed(1)
    return build_vit(arch="vit_debug", patch_size=14, **kw).eval()


def test_dinov2_hub_checkpoint_loads_with_pos_embed_resized(tmp_path):
    hub = _model(img_size=518)
    path = tmp_path / "dinov2_vitdebug14_pretrain.pth"
    torch.save(hub.state_dict(), path)
    m = _model(img_size=224)
    assert ck.load_pretrained_weights(m, str(path)) == "dinov2"
    assert m.pos_embed.shape == (1, 257, 64)
    assert torch.equal(m.blocks[1].attn.qkv.weight, hub.blocks[1].attn.qkv.weight)
    expected = resize_pos_embed(hub.pos_embed.detach(), (16, 16), interpolate_offset=0.0)
    assert torch.allclose(m.pos_embed, expected)


def _dinobloom_file(model, path, chunked=False):
    teacher = {}
    for k, v in model.state_dict().items():
        if chunked and k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.0.{i}." + k.split(".", 2)[2]
        teacher[f"backbone.{k}"] = v
    teacher["dino_head.mlp.0.weight"] = torch.zeros(4, 64)
    teacher["ibot_head.last_layer.weight_v"] = torch.zeros(4, 4)
    torch.save({"teacher": teacher}, path)


@pytest.mark.parametrize("chunked", [False, True])
def test_dinobloom_release_loads_exactly(tmp_path, chunked):
    src = _model(img_size=224)
    _dinobloom_file(src, tmp_path / "dinobloom.pth", chunked)
    m = build_vit(arch="vit_debug", patch_size=14, img_size=224)
    assert ck.load_pretrained_weights(m, str(tmp_path / "dinobloom.pth")) == "dinobloom"
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(m.eval()(x), src(x), atol=1e-6)


def test_cytoray_export_loads_in_dinobloom_style_and_rebuilds(tmp_path):
    src = _model(img_size=224, num_register_tokens=0)
    uri = str(tmp_path / "export.pth")
    ck.export_dinobloom(src, uri, extra={"step": 10})
    # DinoBloom's own loading recipe: teacher dict, strip "backbone.", drop heads, strict load.
    raw = torch.load(uri, weights_only=True)
    sd = {k.replace("backbone.", ""): v for k, v in raw["teacher"].items() if "head" not in k}
    plain = build_vit(arch="vit_debug", patch_size=14, img_size=224)
    plain.load_state_dict(sd, strict=True)
    rebuilt = ck.build_from_checkpoint(uri)
    assert rebuilt.cfg.arch == "vit_debug" and raw["cytoray"]["step"] == 10
    x = torch.randn(1, 3, 224, 224)
    assert torch.allclose(plain.eval()(x), src(x), atol=1e-6) and torch.allclose(rebuilt.eval()(x), src(x), atol=1e-6)


def test_wrong_architecture_names_the_keys(tmp_path):
    torch.save(_model(img_size=224).state_dict(), tmp_path / "small.pth")
    bigger = build_vit(arch="vit_small", patch_size=14, img_size=224)
    with pytest.raises(ck.CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight.*vs model") as err:
        ck.load_pretrained_weights(bigger, str(tmp_path / "small.pth"))
    assert "missing from checkpoint: blocks.10" in str(err.value) or "blocks.2" in str(err.value)
    regs = build_vit(arch="vit_debug", patch_size=14, img_size=224, num_register_tokens=4)
    with pytest.raises(ck.CheckpointError, match="register_tokens"):
        ck.load_pretrained_weights(regs, str(tmp_path / "small.pth"))


class NotData:
    pass


def test_checkpoints_are_data_never_code(tmp_path):
    torch.save({"teacher": {}, "payload": NotData()}, tmp_path / "evil.pth")
    with pytest.raises(ck.CheckpointError, match="weights-only"):
        ck.load_pretrained_weights(_model(img_size=224), str(tmp_path / "evil.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError):
        ck.read_checkpoint(str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("rows,cols", [(2, 3), (3, 2), (2, 5)])
def test_intermediate_layers_reshape_non_square_input_row_major(rows, cols):
    torch.manual_seed(0)
    m = build_vit(arch="vit_debug", patch_size=8, img_size=32, num_register_tokens=2).eval()
    x = torch.randn(2, 3, 8 * rows, 8 * cols)
    (fmap, _), = m.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)
    tokens, = m.get_intermediate_layers(x, n=1)
    assert fmap.shape == (2, 64, rows, cols) and tokens.shape == (2, rows * cols, 64)
    assert torch.equal(fmap, tokens.reshape(2, rows, cols, 64).permute(0, 3, 1, 2))
    assert torch.equal(fmap[:, :, 1, 0], tokens[:, cols])  # the second row starts after the first row's patches


@pytest.mark.parametrize("content", ["tensor", "list", "empty", "non_tensors", "non_tensor_backbone"])
def test_unloadable_checkpoints_name_the_file_and_what_was_expected(tmp_path, content):
    path = tmp_path / f"{content}.pth"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "list":
        torch.save([torch.zeros(3)], path)
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "non_tensors":
        torch.save({"epoch": 3, "args": "lr=0.1"}, path)
    else:
        torch.save({"teacher": {"backbone.pos_embed": [0.0, 1.0]}}, path)
    for load in (lambda: ck.load_pretrained_weights(_model(img_size=224), str(path)), lambda: ck.build_from_checkpoint(str(path))):
        with pytest.raises(ck.CheckpointError) as err:
            load()
        assert str(path) in str(err.value) and "DinoBloom" in str(err.value), str(err.value)


def _features(model, x) -> torch.Tensor:
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]], dim=1)


def _dinov2_reference_features(src, x, offset: float, antialias: bool) -> torch.Tensor:
    """CLS and patch tokens of ``src`` with its pos_embed interpolated as DINOv2's ``interpolate_pos_encoding``."""
    n, d = src.pos_embed.shape[1] - 1, src.pos_embed.shape[2]
    m, h0, w0 = int(n**0.5), x.shape[-2] // src.patch_size, x.shape[-1] // src.patch_size
    grid = src.pos_embed[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2)
    kw = {"scale_factor": ((h0 + offset) / m, (w0 + offset) / m)} if offset else {"size": (h0, w0)}
    patch_pos = torch.nn.functional.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
    pos = torch.cat([src.pos_embed[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, h0 * w0, d)], dim=1)
    ref = build_vit(src.cfg, img_size=h0 * src.patch_size).eval()  # stored grid == input grid: no resampling
    ref.load_state_dict({**src.state_dict(), "pos_embed": pos})
    return _features(ref, x)


@pytest.mark.parametrize("registers,offset,antialias", [(0, 0.1, False), (4, 0.0, True)])
def test_dinov2_hub_checkpoint_for_evaluation_matches_the_official_model(tmp_path, registers, offset, antialias):
    """The hub model keeps its pos_embed grid and interpolates at run time (offset 0.1; ``_reg``: antialiased,
    offset 0): the evaluation build must too, whatever the input size; training init still resizes at load."""
    torch.manual_seed(0)
    src = build_vit(arch="vit_debug", patch_size=8, img_size=40, num_register_tokens=registers,
                    layerscale=1.0).eval()  # 5x5 grid; LayerScale 1 as the hub's init_values
    torch.nn.init.normal_(src.pos_embed, std=1.0)  # a rough pos_embed: interpolation differences show
    path = tmp_path / "dinov2_vitdebug8_pretrain.pth"
    torch.save(src.state_dict(), path)
    built = ck.build_from_checkpoint(str(path)).eval()
    assert (built.cfg.arch, built.cfg.img_size, built.cfg.patch_size, built.num_register_tokens) == \
        ("vit_debug", 40, 8, registers)
    assert (built.cfg.interpolate_offset, built.cfg.interpolate_antialias) == (offset, antialias)
    x = torch.randn(2, 3, 24, 24)  # 3x3 grid
    with torch.no_grad():
        expected = _dinov2_reference_features(src, x, offset, antialias)
        assert torch.allclose(_features(built, x), expected, atol=1e-5)
        trained = build_vit(arch="vit_debug", patch_size=8, img_size=64, num_register_tokens=registers).eval()
        assert ck.load_pretrained_weights(trained, str(path)) == "dinov2" and trained.pos_embed.shape == (1, 65, 64)
        assert not torch.allclose(_features(trained, x), expected, atol=1e-3)  # resized at load: other features
