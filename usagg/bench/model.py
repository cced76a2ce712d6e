"""M2DINO throughput and memory against the dense backbone and the naive every-expert MoE, measured in one run.

Three models share one configuration: the dense DINOv3 ViT (no MoE), M2DINO with sorted top-k dispatch,
and M2DINO with every expert run on every token. Experts are ``dense MLP width / k`` wide, so the dense
model and M2DINO do the same active FLOPs per token (checked with ``torch.utils.flop_counter``). Steps of the
three models are interleaved so that load from other processes affects them alike, and each figure is a
median. On CUDA the steps run under bf16 autocast, memory is ``torch.cuda.max_memory_allocated`` and model
FLOP utilisation is reported against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import copy
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from usagg.bench import register_benchmark
from usagg.config import ModelConfig, TrainConfig
from usagg.model.m2dino import M2DINO
from usagg.model.moe import MoEMlp, every_expert_dispatch, sorted_dispatch
from usagg.model.router import TokenTaskRouter
from usagg.tasks import TaskCard

logger = logging.getLogger(__name__)

TARGET_MOE_VS_DENSE = 0.85
TARGET_MOE_VS_EVERY_EXPERT = 2.5

# Dense bf16 tensor-core peak (FLOP/s, without sparsity) from NVIDIA's data sheets; MFU is left out for other GPUs.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}


@dataclass
class BenchSetting:
    backbone: str = "vit_small_patch16_dinov3"
    depth: int | None = None  # None: the backbone's full depth (12 for ViT-S/16)
    img_size: int = 224
    batch_size: int = 16
    num_experts: int = 8
    top_k: int = 2
    threads: int | None = None  # torch intra-op threads; None keeps the process setting
    train_rounds: int = 4  # measured train steps per model, after one warm-up step that also measures memory
    forward_rounds: int = 3
    layer_rounds: int = 5


FULL = BenchSetting()
QUICK = BenchSetting(img_size=112, batch_size=4, train_rounds=2, forward_rounds=2, layer_rounds=3)
CARD = TaskCard(name="bench_cls", type="classification", num_classes=4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _build(setting: BenchSetting, moe: bool, device: torch.device) -> M2DINO:
    cfg = ModelConfig(
        backbone=setting.backbone,
        depth=setting.depth,
        num_experts=setting.num_experts,
        top_k=setting.top_k,
        moe_blocks=None if moe else [],
        decoder_dim=64,
    )
    torch.manual_seed(0)
    return M2DINO(cfg, [CARD], (setting.img_size, setting.img_size)).to(device)


class TrainStep:
    """One optimiser step of a model on a fixed synthetic batch: forward, task + auxiliary loss, backward, AdamW."""

    def __init__(self, model: M2DINO, images: torch.Tensor, labels: torch.Tensor):
        self.model = model.train()
        self.images, self.labels = images, labels
        # The fused AdamW kernel (CPU and CUDA) keeps the optimiser's share small for both models.
        self.optimizer = torch.optim.AdamW(model.param_groups(TrainConfig()), fused=True)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.images.device):
            outputs = self.model(self.images, CARD.name)
            loss, _ = self.model.compute_loss(outputs, {"label": self.labels}, CARD.name)
            loss = loss + self.model.aux_loss()
        loss.backward()
        self.optimizer.step()


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _interleaved_medians(
    fns: dict[str, Callable[[], None]], rounds: int, device: torch.device, warm_up: bool = True
) -> dict[str, float]:
    """Run each function once to warm up (unless done already), then ``rounds`` times in turn; return median seconds."""
    if warm_up:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _train_flops_per_image(model: M2DINO, image_size: int, device: torch.device) -> float:
    """Count FLOPs of one forward and backward pass of a single image (active FLOPs: only routed experts run)."""
    images = torch.randn(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        with _autocast(device):
            outputs = model(images, CARD.name)
            loss, _ = model.compute_loss(outputs, {"label": torch.zeros(1, dtype=torch.long, device=device)}, CARD.name)
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.routing_stats(reset=True)
    return float(counter.get_total_flops())


def _memory_mb(step: TrainStep, device: torch.device) -> float:
    """Return peak memory of one train step in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU has no allocator statistics, so the figure is an
    estimate: parameters, gradients and AdamW state plus the tensors saved for the backward pass.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    param_storages = {p.untyped_storage().data_ptr() for p in step.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    trainable = sum(p.numel() * p.element_size() for p in step.model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in step.model.parameters() if not p.requires_grad)
    return (frozen + 4 * trainable + sum(saved.values())) / 2**20  # weights + grads + two AdamW moments


def _layer_times(setting: BenchSetting, dense_block_mlp: torch.nn.Module, tokens: int, device: torch.device) -> dict[str, float]:
    """Time forward + backward of one dense MLP, one MoE layer (sorted dispatch) and the every-expert layer."""
    dim = dense_block_mlp.fc1.in_features
    hidden = dense_block_mlp.fc1.out_features // setting.top_k
    torch.manual_seed(0)
    router = TokenTaskRouter(dim, 64, setting.num_experts)
    layer = MoEMlp.from_dense(dense_block_mlp, hidden, setting.num_experts, setting.top_k, router).to(device)
    layer.context.task = CARD.name
    layer.context.task_embedding = torch.randn(64, device=device, requires_grad=True)
    layer.record_stats = False
    dense = dense_block_mlp.to(device)
    x = torch.randn(tokens, dim, device=device, requires_grad=True)

    def run_dense() -> None:
        with _autocast(device):
            out = dense(x)
        out.float().sum().backward()

    def run_moe(dispatch: Callable) -> Callable[[], None]:
        def run() -> None:
            with _autocast(device):
                _, _, weights_TK, experts_TK = layer.route(x, setting.batch_size)
                out = dispatch(x, weights_TK, experts_TK, layer.expert_weights())
            out.float().sum().backward()

        return run

    return _interleaved_medians(
        {"dense": run_dense, "moe": run_moe(sorted_dispatch), "every_expert": run_moe(every_expert_dispatch)},
        setting.layer_rounds,
        device,
    )


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in name), None)


def run_model_benchmark(setting: BenchSetting, device: torch.device | None = None) -> dict:
    """Measure the dense model, M2DINO and the every-expert baseline under ``setting``; return flat figures."""
    threads = torch.get_num_threads()
    if setting.threads is not None:
        torch.set_num_threads(setting.threads)
    try:
        return _run(setting, device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    finally:
        torch.set_num_threads(threads)


def _run(setting: BenchSetting, device: torch.device) -> dict:
    size, batch = setting.img_size, setting.batch_size
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, CARD.num_classes, (batch,), device=device)

    dense_model = _build(setting, moe=False, device=device)
    moe_model = _build(setting, moe=True, device=device)
    every_model = _build(setting, moe=True, device=device)
    every_model.set_dispatch("every_expert")
    for model in (moe_model, every_model):
        model.set_record_routing_stats(False)

    flops = {
        "dense": _train_flops_per_image(dense_model, size, device),
        "moe": _train_flops_per_image(moe_model, size, device),
        "every_expert": _train_flops_per_image(every_model, size, device),
    }
    steps = {name: TrainStep(model, images, labels) for name, model in
             (("dense", dense_model), ("moe", moe_model), ("every_expert", every_model))}
    memory = {name: _memory_mb(step, device) for name, step in steps.items()}  # also the warm-up step
    train = _interleaved_medians(steps, setting.train_rounds, device, warm_up=False)

    def forward_of(model: M2DINO) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), _autocast(device):
                model.eval()(images, CARD.name)

        return run

    forward = _interleaved_medians({"dense": forward_of(dense_model), "moe": forward_of(moe_model)}, setting.forward_rounds, device)

    tokens_per_image = (size // 16) ** 2 + dense_model.backbone.num_prefix_tokens
    dense_mlp = copy.deepcopy(dense_model.backbone.blocks[0].mlp)
    layer = _layer_times(setting, dense_mlp, batch * tokens_per_image, device)

    peak = _peak_flops(device)
    moe_flops_per_s = flops["moe"] * batch / train["moe"]
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "backbone": setting.backbone,
        "img_size": size,
        "batch_size": batch,
        "num_experts": setting.num_experts,
        "top_k": setting.top_k,
        "moe_blocks": moe_model.backbone.moe_blocks,
        "dense_train_images_per_s": batch / train["dense"],
        "moe_train_images_per_s": batch / train["moe"],
        "every_expert_train_images_per_s": batch / train["every_expert"],
        "moe_vs_dense_ratio": train["dense"] / train["moe"],
        "moe_vs_every_expert_speedup": layer["every_expert"] / layer["moe"],
        "moe_vs_every_expert_model_speedup": train["every_expert"] / train["moe"],
        "dense_forward_images_per_s": batch / forward["dense"],
        "moe_forward_images_per_s": batch / forward["moe"],
        "moe_vs_dense_forward_ratio": forward["dense"] / forward["moe"],
        "layer_dense_ms": 1000 * layer["dense"],
        "layer_moe_ms": 1000 * layer["moe"],
        "layer_every_expert_ms": 1000 * layer["every_expert"],
        "moe_dispatch_overhead": layer["moe"] / layer["dense"] - 1,
        "dense_train_gflops_per_image": flops["dense"] / 1e9,
        "moe_train_gflops_per_image": flops["moe"] / 1e9,
        "every_expert_train_gflops_per_image": flops["every_expert"] / 1e9,
        # The every-expert model's speed-up is bounded by its FLOP ratio, since attention and heads are shared.
        "every_expert_model_flop_ratio": flops["every_expert"] / flops["moe"],
        "moe_achieved_tflops": moe_flops_per_s / 1e12,
        "mfu": moe_flops_per_s / peak if peak else None,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "estimate: weights, grads, AdamW state, saved activations",
        "dense_peak_memory_mb": memory["dense"],
        "moe_peak_memory_mb": memory["moe"],
        "every_expert_peak_memory_mb": memory["every_expert"],
        "target_moe_vs_dense": TARGET_MOE_VS_DENSE,
        "target_moe_vs_every_expert": TARGET_MOE_VS_EVERY_EXPERT,
    }
    # The targets are set for the full setting (224 px, batch 16); smaller batches report no verdict.
    full = setting == FULL
    results["meets_moe_vs_dense"] = results["moe_vs_dense_ratio"] >= TARGET_MOE_VS_DENSE if full else None
    results["meets_moe_vs_every_expert"] = (
        results["moe_vs_every_expert_speedup"] >= TARGET_MOE_VS_EVERY_EXPERT if full else None
    )
    return results


@register_benchmark("model", "M2DINO train step vs the dense ViT (same active FLOPs) and the every-expert MoE baseline")
def bench_model(quick: bool = False) -> dict:
    setting = QUICK if quick else FULL
    logger.info("model benchmark on %s: %s", platform.node() or "this machine", setting)
    return run_model_benchmark(setting)
