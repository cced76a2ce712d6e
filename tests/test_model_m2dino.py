"""M2DINO assembly at tiny size: every head and router mode, task independence, fine-tuning and statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from usagg.config import ModelConfig, TrainConfig
from usagg.errors import ConfigError
from usagg.model import M2DINO, build_model
from usagg.tasks import TaskCard

TINY = {"backbone": "vit_tiny_patch16_dinov3_qkvb", "depth": 4, "decoder_dim": 16, "num_experts": 4, "top_k": 2}
IMAGE_HW = (32, 48)

CARDS = {
    "seg": TaskCard(name="seg", type="segmentation", num_classes=3),
    "cls": TaskCard(name="cls", type="classification", num_classes=4),
    "det": TaskCard(name="det", type="detection"),
    "kp": TaskCard(name="kp", type="regression", num_keypoints=2),
    "hc.mm": TaskCard(name="hc.mm", type="regression", target="head_circumference_mm"),
}


def _targets(batch: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    height, width = IMAGE_HW
    return {
        "seg": {"mask": torch.randint(0, 3, (batch, height, width))},
        "cls": {"label": torch.tensor([1, 3])},
        "det": {"boxes": torch.tensor([[[4.0, 4.0, 20.0, 28.0]], [[10.0, 2.0, 40.0, 30.0]]]), "boxes_valid": torch.ones(batch, 1, dtype=torch.bool)},
        "kp": {"keypoints": torch.tensor([[[5.0, 6.0], [30.0, 20.0]], [[40.0, 10.0], [12.0, 25.0]]])},
        "hc.mm": {"value": torch.tensor([160.0, 180.0])},
    }


def _model(cards=None, **overrides) -> M2DINO:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, **overrides})
    return M2DINO(cfg, list((cards or CARDS).values()), IMAGE_HW)


@pytest.mark.parametrize("router", ["token_task", "task", "per_task"])
def test_every_head_trains_with_each_router(router):
    model = _model(router=router)
    images = torch.randn(2, 3, *IMAGE_HW)
    expected_keys = {"seg": {"logits"}, "cls": {"logits"}, "det": {"boxes", "objectness", "image_size"},
                     "kp": {"heatmaps", "keypoints"}, "hc.mm": {"standardized"}}
    for task, target in _targets().items():
        model.zero_grad(set_to_none=True)
        outputs = model(images, task)
        assert set(outputs) == expected_keys[task]
        loss, parts = model.compute_loss(outputs, target, task)
        aux = model.aux_loss()
        assert torch.isfinite(loss)
        assert torch.isfinite(aux)
        assert parts
        (loss + aux).backward()
        head_grads = [p.grad for p in model.head(task).parameters() if p.grad is not None]
        assert head_grads and all(torch.isfinite(g).all() for g in head_grads)
        router_grads = [p.grad for n, p in model.named_parameters() if ".router." in n and p.grad is not None]
        assert router_grads and any(g.abs().sum() > 0 for g in router_grads), f"{task}: router got no gradient"
        expert_grad = model.moe_layers()[3].fc1_weight.grad
        assert expert_grad is not None and expert_grad.abs().sum() > 0
        other_heads = [t for t in CARDS if t != task]
        for other in other_heads:
            assert all(p.grad is None for p in model.head(other).parameters()), f"{task} loss reached head {other}"


def test_predictions_in_input_pixels_and_units():
    model = _model().eval()
    model.set_target_stats("hc.mm", mean=170.0, std=10.0)
    images = torch.randn(2, 3, *IMAGE_HW)
    height, width = IMAGE_HW
    with torch.no_grad():
        seg = model.predict(model(images, "seg"), "seg")
        det = model.predict(model(images, "det"), "det")
        kp = model.predict(model(images, "kp"), "kp")
        hc = model.predict(model(images, "hc.mm"), "hc.mm")
    assert seg["probs"].shape == (2, 3, height, width)
    assert det["boxes"].shape == (2, 1, 4)
    assert det["scores"].shape == (2, 1)
    assert kp["keypoints"].shape == (2, 2, 2)
    assert ((kp["keypoints"][..., 0] >= 0) & (kp["keypoints"][..., 0] <= width)).all()
    assert hc["value"].shape == (2,)
    assert (hc["value"] - 170.0).abs().max() < 10.0 * 20  # de-standardised around the mean


def test_set_target_stats_rejects_other_kinds():
    model = _model()
    with pytest.raises(ConfigError, match="scalar regression"):
        model.set_target_stats("cls", 0.0, 1.0)


def test_adding_task_keeps_other_heads_and_shapes():
    for router in ("token_task", "task", "per_task"):
        alone = _model({"seg": CARDS["seg"]}, router=router).state_dict()
        joint = _model({"seg": CARDS["seg"], "cls": CARDS["cls"]}, router=router).state_dict()
        head_alone = {k: v for k, v in alone.items() if k.startswith("heads.seg.")}
        head_joint = {k: v for k, v in joint.items() if k.startswith("heads.seg.")}
        assert head_alone.keys() == head_joint.keys()
        for key, value in head_alone.items():
            assert value.shape == head_joint[key].shape, key
            assert torch.equal(value, head_joint[key]), f"{router}: {key} starts differently"
        for key, value in alone.items():
            assert key in joint, f"{router}: {key} disappears when a task is added"
            assert joint[key].shape == value.shape, f"{router}: {key} changes shape when a task is added"
        assert torch.equal(alone["task_embed.seg"] if "task_embed.seg" in alone else torch.zeros(1),
                           joint["task_embed.seg"] if "task_embed.seg" in joint else torch.zeros(1))


def test_rectangular_and_invalid_sizes():
    model = _model()
    outputs = model(torch.randn(1, 3, 64, 32), "seg")
    assert outputs["logits"].shape == (1, 3, 64, 32)
    with pytest.raises(ConfigError, match="multiple of the 16 px patch size"):
        model(torch.randn(1, 3, 40, 32), "seg")
    with pytest.raises(ConfigError, match="no head for task 'nope'"):
        model(torch.randn(1, 3, 32, 32), "nope")


def test_block_indices_are_validated():
    with pytest.raises(ConfigError, match="moe_blocks: block 4 is out of range"):
        _model(moe_blocks=[2, 4])
    with pytest.raises(ConfigError, match="feature_blocks"):
        _model(feature_blocks=[1, 1])


def test_model_settings_checked_without_building(tmp_path):
    from usagg.model.backbone import BACKBONE_DEPTHS, check_model_config

    with pytest.raises(ConfigError, match=r"model.depth: 20 is more than the 12 blocks of vit_tiny_patch16_dinov3_qkvb; .* 1..12"):
        check_model_config(ModelConfig(backbone="vit_tiny_patch16_dinov3_qkvb", depth=20))
    with pytest.raises(ConfigError, match="model.depth: 20 is more than the 12 blocks"):
        _model(depth=20)
    with pytest.raises(ConfigError, match="model.feature_blocks: the heads need at least one block; .* 0..1"):
        check_model_config(ModelConfig(backbone="vit_tiny_patch16_dinov3_qkvb", depth=2, feature_blocks=[]))
    with pytest.raises(ConfigError, match="model.moe_blocks: block 7 is out of range for vit_large_patch16_dinov3 with 6 blocks"):
        check_model_config(ModelConfig(backbone="vit_large_patch16_dinov3", depth=6, moe_blocks=[7]))
    with pytest.raises(ConfigError, match="model.pretrained: file .*absent.pth not found"):
        check_model_config(ModelConfig(pretrained=tmp_path / "absent.pth"))
    check_model_config(ModelConfig(backbone="vit_large_patch16_dinov3", moe_blocks=[23]))
    # The table agrees with the depth timm builds (on the meta device: no memory, no weights).
    for name, depth in BACKBONE_DEPTHS.items():
        with torch.device("meta"):
            assert len(timm.create_model(name, pretrained=False, num_classes=0).blocks) == depth


def test_default_blocks_are_second_half():
    model = _model()
    assert model.backbone.moe_blocks == [2, 3]
    assert model.backbone.feature_blocks == [0, 1, 2, 3]
    dense = _model(moe_blocks=[])
    assert dense.moe_layers() == {}
    assert dense.aux_loss().item() == 0.0


def test_frozen_and_last_n_finetuning():
    frozen = _model(finetune="frozen")
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert not any(n.startswith("backbone.vit.") and ".mlp." not in n for n in trainable)
    assert any(n.startswith("backbone.vit.blocks.3.mlp.fc1_weight") for n in trainable)
    assert any(n.startswith("heads.") for n in trainable)

    last = _model(finetune="last_n", trainable_blocks=1, moe_blocks=[])
    flags = {n: p.requires_grad for n, p in last.named_parameters()}
    assert flags["backbone.vit.blocks.3.attn.qkv.weight"]
    assert flags["backbone.vit.norm.weight"]
    assert not flags["backbone.vit.blocks.2.attn.qkv.weight"]
    assert not flags["backbone.vit.patch_embed.proj.weight"]
    grouped = {id(p) for group in last.param_groups(TrainConfig()) for p in group["params"]}
    assert id(last.backbone.vit.blocks[2].attn.qkv.weight) not in grouped


def test_param_groups_layer_decay_and_weight_decay():
    model = _model(layer_decay=0.5)
    train = TrainConfig(lr_backbone=1.0, lr_moe=2.0, lr_head=3.0, weight_decay=0.1)
    groups = model.param_groups(train)
    by_param = {name: group for group in groups for name in group["param_names"]}
    depth = 4
    assert by_param["backbone.vit.patch_embed.proj.weight"]["lr"] == pytest.approx(0.5 ** (depth + 1))
    assert by_param["backbone.vit.blocks.1.attn.qkv.weight"]["lr"] == pytest.approx(0.5 ** (depth - 1))
    assert by_param["backbone.vit.norm.weight"]["lr"] == pytest.approx(1.0)
    assert by_param["backbone.vit.blocks.3.mlp.fc1_weight"]["lr"] == pytest.approx(2.0 * 0.5)
    assert by_param["backbone.vit.blocks.3.mlp.router.proj.weight"]["lr"] == pytest.approx(2.0)
    assert by_param["task_embed.seg"]["weight_decay"] == 0.0
    assert by_param["backbone.vit.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_param["backbone.vit.blocks.3.mlp.fc1_bias"]["weight_decay"] == 0.0
    assert by_param["backbone.vit.cls_token"]["weight_decay"] == 0.0
    assert by_param["backbone.vit.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.1
    assert by_param["heads.cls.fc.weight"]["lr"] == pytest.approx(3.0)
    all_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(by_param) == all_trainable
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


def test_shared_parameters_exclude_task_specific():
    model = _model(router="per_task")
    shared = {id(p) for p in model.shared_parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in shared}
    assert any(".mlp.fc1_weight" in n for n in names)
    assert not any(n.startswith("heads.") or ".gates." in n for n in names)


def test_routing_stats_per_task_and_reset():
    model = _model()
    images = torch.randn(2, 3, *IMAGE_HW)
    model(images, "seg")
    model(images, "cls")
    model(images, "cls")
    stats = model.routing_stats(reset=True)
    assert stats["num_experts"] == 4
    assert stats["layers"] == [2, 3]
    tokens = 2 * (1 + 4 + 2 * 3)  # CLS + 4 registers + 6 patches per image
    layer = stats["tasks"]["cls"]["3"]
    assert layer["num_tokens"] == 2 * tokens
    assert sum(layer["tokens_per_expert"]) == 2 * tokens * 2
    assert set(layer) >= {"tokens_per_expert", "entropy", "unused_experts", "top20_share"}
    assert stats["tasks"]["seg"]["2"]["num_tokens"] == tokens
    assert model.routing_stats()["tasks"] == {}


def test_task_router_gives_each_sample_one_expert_set():
    model = _model(router="task")
    model(torch.randn(3, 3, *IMAGE_HW), "kp")
    stats = model.routing_stats()["tasks"]["kp"]
    experts = model.task_experts("kp")
    for block, layer in stats.items():
        used = [e for e, count in enumerate(layer["tokens_per_expert"]) if count]
        assert used == experts[int(block)]
        assert len(used) == 2


def test_build_model_warns_on_random_init(caplog, monkeypatch):
    monkeypatch.setattr("usagg.model.m2dino._WARNED_RANDOM", set())  # as in a fresh process
    with caplog.at_level("WARNING", logger="usagg.model.m2dino"):
        build_model(ModelConfig(**TINY), [CARDS["cls"]], IMAGE_HW)
        build_model(ModelConfig(**TINY), [CARDS["cls"]], IMAGE_HW)
    assert caplog.text.count("random weights") == 1  # once per backbone, not once per run


def test_probe_forwards_leave_routing_state():
    model = _model(mi_loss_weight=1.0)
    images = torch.randn(1, 3, *IMAGE_HW)
    model(images, "seg")
    with model.routing_side_effects_off():
        model(images, "cls")
    assert set(model.routing_stats()["tasks"]) == {"seg"}
    assert [entry[0] for entry in model.moe_layers()[3].mutual_information.window] == ["seg"]


def test_checkpointed_blocks_count_each_batch_once():
    model = _model(grad_checkpointing=True, mi_loss_weight=1.0)
    outputs = model(torch.randn(2, 3, *IMAGE_HW), "cls")
    loss, _ = model.compute_loss(outputs, _targets()["cls"], "cls")
    loss.backward()
    stats = model.routing_stats()["tasks"]["cls"]["3"]
    assert stats["num_tokens"] == 2 * (5 + 2 * 3)
    assert len(model.moe_layers()[3].mutual_information.window) == 1


def test_mutual_information_loss_after_two_tasks():
    model = _model(mi_loss_weight=1.0, balance_loss_weight=0.0, z_loss_weight=0.0)
    images = torch.randn(2, 3, *IMAGE_HW)
    model(images, "seg")
    assert model.aux_loss_parts()["moe_mi"] == 0.0  # one task in the window so far
    model(images, "cls")
    mi = model.aux_loss()
    assert mi.item() > 0
    mi.backward()
    assert model.task_embed["cls"].grad is not None
    with torch.no_grad():
        model(images, "cls")
    assert model.aux_loss().item() == 0.0


def test_model_docs_example_runs(shared_data, monkeypatch):
    """The Python example at the top of docs/model.md runs as written (from the repository root)."""
    repo = Path(__file__).resolve().parents[1]
    code = (repo / "docs" / "model.md").read_text().split("```python")[1].split("```")[0]
    monkeypatch.chdir(repo)
    namespace: dict = {}
    exec(compile(code, "docs/model.md", "exec"), namespace)
    assert tuple(namespace["predictions"]["probs"].shape) == (4, 2)
    assert all(r.split is None or r.split == "train" for r in namespace["train_records"])
