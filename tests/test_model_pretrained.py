"""Loading local weights: the official DINOv3 key layout, timm safetensors files, M2DINO checkpoints, bad files."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from usagg.config import ModelConfig
from usagg.errors import ConfigError
from usagg.model import M2DINO, load_pretrained
from usagg.model.moe import MoEMlp
from usagg.tasks import TaskCard

TINY = "vit_tiny_patch16_dinov3_qkvb"
DEPTH = 2
IMAGE_HW = (32, 32)
CARD = TaskCard(name="cls", type="classification", num_classes=3)


def _source_vit(name: str = TINY, seed: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    vit = timm.create_model(name, pretrained=False, num_classes=0, depth=DEPTH, img_size=IMAGE_HW, dynamic_img_size=True)
    with torch.no_grad():  # layer scale starts at 1e-5; make the blocks matter for the comparisons
        for block in vit.blocks:
            block.gamma_1.fill_(0.5)
            block.gamma_2.fill_(0.5)
            if block.attn.q_bias is not None:
                block.attn.q_bias.normal_()
                block.attn.v_bias.normal_()
    return vit.eval()


def _official_layout(timm_state: dict[str, torch.Tensor], embed_dim: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Write timm Eva weights under the key names of the facebookresearch/dinov3 checkpoints (inverse mapping)."""
    out = {}
    for key, value in timm_state.items():
        if key.endswith("attn.v_bias"):
            continue
        if key.endswith("attn.q_bias"):
            prefix = key[: -len("q_bias")]
            v_bias = timm_state[prefix + "v_bias"]
            out[prefix + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
            out[prefix + "qkv.bias_mask"] = torch.cat([torch.ones_like(value), torch.zeros_like(value), torch.ones_like(value)])
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[key] = value.clone()
    out["mask_token"] = torch.zeros(1, embed_dim)
    out["rope_embed.periods"] = torch.ones(head_dim // 4)
    return out


def _model(**overrides) -> M2DINO:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=TINY, depth=DEPTH, decoder_dim=16, num_experts=4, **overrides)
    return M2DINO(cfg, [CARD], IMAGE_HW).eval()


def _features(module, images):
    return module.forward_intermediates(images, indices=[DEPTH - 1], norm=True, intermediates_only=True)[0]


def test_official_checkpoint_loads_without_missing_keys(tmp_path):
    source = _source_vit()
    official = _official_layout(source.state_dict(), source.embed_dim, source.embed_dim // source.blocks[0].attn.num_heads)
    assert "storage_tokens" in official
    assert "blocks.0.ls1.gamma" in official
    assert "blocks.0.attn.qkv.bias" in official
    file = tmp_path / "dinov3_vitt16.pth"
    torch.save(official, file)

    dense = _model(moe_blocks=[])
    report = load_pretrained(dense, file)
    assert report.source_format == "official_dinov3"
    assert report.missing == []
    assert report.unexpected == []
    images = torch.randn(2, 3, *IMAGE_HW)
    with torch.no_grad():
        torch.testing.assert_close(_features(dense.backbone.vit, images), _features(source, images))

    moe = _model()
    report = load_pretrained(moe, file)
    assert report.missing == []
    assert report.experts_from_dense == [1]
    assert all(".router." in key for key in report.new_parameters)
    layer = moe.moe_layers()[1]
    torch.testing.assert_close(layer.fc1_weight[0], source.blocks[1].mlp.fc1.weight[: layer.hidden])


def test_official_qkv_bias_dropped_for_model_without_bias(tmp_path, capsys):
    source = _source_vit("vit_small_patch16_dinov3_qkvb")
    official = _official_layout(source.state_dict(), source.embed_dim, source.embed_dim // source.blocks[0].attn.num_heads)
    file = tmp_path / "vits16.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}}, file)  # a training checkpoint
    torch.manual_seed(0)
    model = M2DINO(ModelConfig(backbone="vit_small_patch16_dinov3", depth=DEPTH, moe_blocks=[], decoder_dim=16), [CARD], IMAGE_HW)
    report = load_pretrained(model, file)
    assert report.missing == []
    assert "q_bias" not in capsys.readouterr().out  # timm's filter prints this case; usagg keeps it off stdout


def test_timm_safetensors_file_loads(tmp_path):
    source = _source_vit(seed=3)
    file = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    model = _model(moe_blocks=[])
    report = load_pretrained(model, file)
    assert report.source_format == "timm"
    assert report.missing == []
    assert report.unexpected == []
    images = torch.randn(1, 3, *IMAGE_HW)
    with torch.no_grad():
        torch.testing.assert_close(_features(model.backbone.vit, images), _features(source, images))


def test_m2dino_checkpoint_round_trip(tmp_path):
    trained = _model(router="task")
    with torch.no_grad():
        trained.moe_layers()[1].fc2_weight.mul_(3.0)
    file = tmp_path / "m2dino.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(file))
    fresh = _model(router="task", expert_init="random")
    report = load_pretrained(fresh, file)
    assert report.source_format == "m2dino"
    assert report.missing == []
    assert report.new_parameters == []
    torch.testing.assert_close(fresh.moe_layers()[1].fc2_weight, trained.moe_layers()[1].fc2_weight)


def test_random_expert_init_discards_dense_mlp(tmp_path):
    source = _source_vit()
    file = tmp_path / "w.pth"
    torch.save(source.state_dict(), file)
    model = _model(expert_init="random")
    before = model.moe_layers()[1].fc1_weight.detach().clone()
    report = load_pretrained(model, file)
    assert report.experts_from_dense == []
    assert "blocks.1.mlp.fc1.weight" in report.unexpected
    torch.testing.assert_close(model.moe_layers()[1].fc1_weight, before)
    assert isinstance(model.backbone.vit.blocks[1].mlp, MoEMlp)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    source = _source_vit()
    file = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), file)
    torch.manual_seed(0)
    small = M2DINO(ModelConfig(backbone="vit_small_patch16_dinov3_qkvb", depth=DEPTH, moe_blocks=[], decoder_dim=16), [CARD], IMAGE_HW)
    with pytest.raises(ConfigError, match=r"'cls_token' has shape \(1, 1, 192\) in the file but \(1, 1, 384\) in the model"):
        load_pretrained(small, file)


def test_missing_keys_are_reported(tmp_path):
    source = _source_vit()
    state = source.state_dict()
    del state["blocks.0.norm1.weight"]
    state["extra.weight"] = torch.zeros(2)
    file = tmp_path / "partial.pth"
    torch.save(state, file)
    with pytest.raises(ConfigError, match=r"partial.pth lacks 1 tensor\(s\) .*: blocks.0.norm1.weight; .*pretrained_allow_missing"):
        load_pretrained(_model(moe_blocks=[]), file)
    report = load_pretrained(_model(moe_blocks=[], pretrained_allow_missing=True), file)
    assert report.missing == ["blocks.0.norm1.weight"]
    assert report.unexpected == ["extra.weight"]
    summary = report.summary()
    assert summary["missing"] == ["blocks.0.norm1.weight"]
    assert summary["unexpected"] == 1
    assert summary["format"] == "timm"
    assert summary["bytes"] == file.stat().st_size


def test_plain_vit_file_is_refused(tmp_path):
    """A timm ViT without register tokens and layer scale has the same widths but is another architecture."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=DEPTH, img_size=IMAGE_HW)
    file = tmp_path / "plain_vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, file)
    with pytest.raises(ConfigError, match=r"lacks \d+ tensor\(s\) .*reg_token"):
        load_pretrained(_model(moe_blocks=[]), file)


def test_moe_shape_mismatch_names_moe_settings(tmp_path):
    """An M2DINO checkpoint with other expert counts points at the MoE settings, not the backbone."""
    file = tmp_path / "m2dino.safetensors"
    save_file({k: v.contiguous() for k, v in _model(moe_blocks=[1]).state_dict().items()}, file)
    with pytest.raises(ConfigError, match=r"\(4, 384\) in the file but \(8, 384\) in the model; .*model.num_experts"):
        load_pretrained(M2DINO(ModelConfig(backbone=TINY, depth=DEPTH, decoder_dim=16, num_experts=8, moe_blocks=[1]), [CARD], IMAGE_HW), file)


def test_dense_width_mismatch_names_model_width(tmp_path):
    small = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, depth=DEPTH, img_size=IMAGE_HW)
    state = {k: v for k, v in _source_vit().state_dict().items()}
    state["blocks.1.mlp.fc1.weight"] = small.state_dict()["blocks.1.mlp.fc1.weight"][:, :192]
    file = tmp_path / "w.pth"
    torch.save(state, file)
    with pytest.raises(ConfigError, match=r"has shape \(1536, 192\) in the file but the model's dense MLP, .* has \(768, 192\)"):
        load_pretrained(_model(moe_blocks=[1]), file)


def test_bad_files_raise_config_error(tmp_path):
    model = _model(moe_blocks=[])
    with pytest.raises(ConfigError, match="not found"):
        load_pretrained(model, tmp_path / "absent.pth")
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(ConfigError, match="expected .safetensors, .pth"):
        load_pretrained(model, text)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="cannot read .*broken.pth as a weights file: [^\n]*; give an unmodified"):
        load_pretrained(model, broken)
    with pytest.raises(ConfigError, match=f"{tmp_path} is a folder; give the path of the .pth or .safetensors file in it"):
        load_pretrained(model, tmp_path)


def test_safetensors_saved_as_bin_loads(tmp_path):
    source = _source_vit()
    file = tmp_path / "weights.bin"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, file)
    report = load_pretrained(_model(moe_blocks=[]), file)
    assert report.missing == []
    assert report.source_format == "timm"


def test_build_model_loads_configured_file(tmp_path):
    from usagg.model import build_model

    source = _source_vit()
    file = tmp_path / "w.pth"
    torch.save(source.state_dict(), file)
    cfg = ModelConfig(backbone=TINY, depth=DEPTH, decoder_dim=16, num_experts=4, moe_blocks=[], pretrained=file)
    model = build_model(cfg, [CARD], IMAGE_HW).eval()
    torch.testing.assert_close(model.backbone.vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
