"""M2DINO: a DINOv3 ViT whose later blocks are task-conditioned MoE layers, with one light head per task."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from usagg.config import ModelConfig, TrainConfig
from usagg.errors import ConfigError
from usagg.model.backbone import DinoBackbone
from usagg.model.heads import ScalarHead, TaskHead, build_head
from usagg.model.keys import task_key, task_rng
from usagg.model.moe import DISPATCH_MODES, MoEMlp
from usagg.model.param_groups import build_param_groups
from usagg.model.router import RoutingContext, build_router
from usagg.tasks import TaskCard

logger = logging.getLogger(__name__)


class M2DINO(nn.Module):
    """The multi-task model. Batches hold one task each: ``forward(images, task)``.

    Adding a task adds its head, task embedding and (``per_task`` routers) gates under its own name and
    never changes the shape of another parameter. Per-task parameters are initialised from a random stream
    seeded by the global seed and the task name, so a task's head starts identical in every paradigm.
    """

    def __init__(self, cfg: ModelConfig, tasks: Sequence[TaskCard], img_size_hw: tuple[int, int]):
        super().__init__()
        names = [card.name for card in tasks]
        if not names:
            raise ConfigError("M2DINO needs at least one task card")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"task names must be unique; repeated: {', '.join(repeated)}")
        self.cfg = cfg.model_copy(deep=True)
        self.img_size_hw = (int(img_size_hw[0]), int(img_size_hw[1]))
        self.task_kinds = {card.name: card.kind for card in tasks}
        self.backbone = DinoBackbone(cfg, self.img_size_hw)
        self.routing_context = RoutingContext()

        uses_embedding = cfg.router in ("token_task", "task") and bool(self.backbone.moe_blocks)
        self.task_embed: nn.ParameterDict | None = None
        if uses_embedding:
            self.task_embed = nn.ParameterDict()
            for name in names:
                with task_rng(name):
                    self.task_embed[task_key(name)] = nn.Parameter(torch.randn(cfg.task_embed_dim))
        self._install_moe(names)

        self.heads = nn.ModuleDict()
        num_maps = len(self.backbone.feature_blocks)
        for card in tasks:
            with task_rng(card.name):
                self.heads[task_key(card.name)] = build_head(card, cfg, self.backbone.embed_dim, num_maps)
        self.backbone.apply_finetune(cfg.finetune, cfg.trainable_blocks)

    def _install_moe(self, tasks: list[str]) -> None:
        cfg = self.cfg
        dim = self.backbone.embed_dim
        for index in self.backbone.moe_blocks:
            block = self.backbone.blocks[index]
            dense_hidden = getattr(getattr(block.mlp, "fc1", None), "out_features", None)
            if dense_hidden is None:
                raise ConfigError(f"model.moe_blocks: block {index} of {cfg.backbone} has no plain MLP to turn into experts")
            hidden = cfg.expert_hidden or max(1, dense_hidden // cfg.top_k)
            router = build_router(cfg.router, dim, cfg.task_embed_dim, cfg.num_experts, tasks)
            layer = MoEMlp.from_dense(
                block.mlp, hidden, cfg.num_experts, cfg.top_k, router, context=self.routing_context, mi_window=cfg.mi_window
            )
            if cfg.expert_init == "random":
                layer.reset_experts()
            layer.compute_mi = cfg.mi_loss_weight > 0
            block.mlp = layer
        if self.backbone.moe_blocks:
            logger.debug("MoE in blocks %s: %d experts, top-%d, router %s", self.backbone.moe_blocks, cfg.num_experts, cfg.top_k, cfg.router)

    # --- structure --------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return list(self.task_kinds)

    def moe_layers(self) -> dict[int, MoEMlp]:
        """Return the MoE layers by 0-based block index."""
        return {i: self.backbone.blocks[i].mlp for i in self.backbone.moe_blocks}

    def head(self, task: str) -> TaskHead:
        key = task_key(task)
        if key not in self.heads:
            raise ConfigError(f"the model has no head for task {task!r}; it was built for: {', '.join(self.tasks)}")
        return self.heads[key]

    def set_dispatch(self, mode: str) -> None:
        """Switch every MoE layer between ``sorted`` dispatch and the naive ``every_expert`` baseline."""
        if mode not in DISPATCH_MODES:
            raise ValueError(f"unknown dispatch {mode!r}; choose one of {', '.join(DISPATCH_MODES)}")
        for layer in self.moe_layers().values():
            layer.dispatch = mode

    # --- the contract used by training and evaluation ---------------------------------------------

    def forward(self, images: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
        """Return the raw outputs of ``task``'s head for a batch of that task's images ``[B, 3, H, W]``."""
        head = self.head(task)
        self.routing_context.task = task
        self.routing_context.task_embedding = self.task_embed[task_key(task)] if self.task_embed is not None else None
        features = self.backbone(images)
        return head(features)

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], target: dict[str, torch.Tensor], task: str, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the unweighted task loss and its parts; MoE auxiliary losses are separate (:meth:`aux_loss`)."""
        return self.head(task).loss(outputs, target, label_smoothing=label_smoothing)

    def aux_loss(self) -> torch.Tensor:
        """Return the weighted MoE auxiliary losses of the last forward pass, averaged over MoE layers (0 without MoE)."""
        layers = [layer for layer in self.moe_layers().values() if layer.last_aux]
        if not layers:
            return torch.zeros((), device=next(self.parameters()).device)
        cfg = self.cfg
        total = 0.0
        for layer in layers:
            aux = layer.last_aux
            total = total + cfg.balance_loss_weight * aux["balance"] + cfg.z_loss_weight * aux["z"] + cfg.mi_loss_weight * aux["mi"]
        return total / len(layers)

    def aux_loss_parts(self) -> dict[str, float]:
        """Return the unweighted auxiliary losses of the last forward pass, averaged over MoE layers, for logging."""
        layers = [layer for layer in self.moe_layers().values() if layer.last_aux]
        if not layers:
            return {}
        return {
            f"moe_{name}": float(sum(layer.last_aux[name].detach() for layer in layers)) / len(layers)
            for name in ("balance", "z", "mi")
        }

    @torch.no_grad()
    def predict(self, outputs: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
        """Turn raw outputs into predictions in input pixels and task units (see each head's ``predict``)."""
        return self.head(task).predict(outputs)

    @torch.no_grad()
    def set_target_stats(self, task: str, mean: float, std: float) -> None:
        """Set the standardisation of a scalar-regression task's target (stored as buffers with the weights)."""
        head = self.head(task)
        if not isinstance(head, ScalarHead):
            raise ConfigError(f"set_target_stats applies to scalar regression tasks; {task!r} is a {self.task_kinds[task]} task")
        head.set_target_stats(mean, std)

    def param_groups(self, train_cfg: TrainConfig) -> list[dict]:
        """Return AdamW parameter groups (see :func:`usagg.model.param_groups.build_param_groups`)."""
        return build_param_groups(self, train_cfg)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Return the trainable parameters every task uses: backbone, experts and shared routers.

        Task embeddings, per-task gates and heads belong to one task each and are left out.
        """
        return [
            param
            for name, param in self.backbone.vit.named_parameters()
            if param.requires_grad and ".router.gates." not in name
        ]

    # --- routing statistics -----------------------------------------------------------------------

    def set_record_routing_stats(self, enabled: bool) -> None:
        for layer in self.moe_layers().values():
            layer.record_stats = enabled

    @contextlib.contextmanager
    def routing_side_effects_off(self) -> Iterator[None]:
        """Run extra forward passes (affinity probes, lookahead steps) without touching routing statistics or the MI window."""
        previous = self.routing_context.record
        self.routing_context.record = False
        try:
            yield
        finally:
            self.routing_context.record = previous

    def routing_stats(self, reset: bool = False) -> dict:
        """Return routing statistics per task and MoE layer accumulated since the last reset.

        Format: ``{"num_experts", "top_k", "router", "layers": [block indices], "tasks": {task: {str(block):
        {"tokens_per_expert", "num_tokens", "entropy", "usage_entropy", "unused_experts", "top20_share"}}}}``.
        """
        layers = self.moe_layers()
        tasks: dict[str, dict[str, dict]] = {}
        for index, layer in layers.items():
            for task, summary in layer.stats.summary().items():
                tasks.setdefault(task, {})[str(index)] = summary
            if reset:
                layer.stats.reset()
        return {
            "num_experts": self.cfg.num_experts if layers else 0,
            "top_k": self.cfg.top_k if layers else 0,
            "router": self.cfg.router,
            "layers": sorted(layers),
            "tasks": tasks,
        }

    @torch.no_grad()
    def task_experts(self, task: str) -> dict[int, list[int]]:
        """Return the experts that ``task`` uses in each MoE layer under ``router: task`` (its sub-network)."""
        if self.cfg.router != "task":
            raise ConfigError(f"a task's expert set is fixed only with model.router: task (this model uses {self.cfg.router})")
        self.head(task)
        embedding = self.task_embed[task_key(task)]
        out = {}
        for index, layer in self.moe_layers().items():
            logits = torch.nn.functional.linear(embedding, layer.router.proj.weight, layer.router.proj.bias)
            out[index] = sorted(logits.topk(layer.top_k).indices.tolist())
        return out


def build_model(
    model_cfg: ModelConfig, tasks: Sequence[TaskCard], img_size_hw: tuple[int, int], load_pretrained_file: bool = True
) -> M2DINO:
    """Build M2DINO for ``tasks`` and load ``model_cfg.pretrained`` if set (random initialisation otherwise).

    What the file gave is kept as ``model.pretrained_report`` (a ``LoadReport``, None when nothing was loaded).
    ``load_pretrained_file=False`` skips the file, for a model whose every weight a checkpoint will replace.
    """
    model = M2DINO(model_cfg, tasks, img_size_hw)
    model.pretrained_report = None
    if model_cfg.pretrained is not None:
        if load_pretrained_file:
            from usagg.model.pretrained import load_pretrained

            model.pretrained_report = load_pretrained(model, model_cfg.pretrained)
    elif model_cfg.backbone not in _WARNED_RANDOM:
        # Once per backbone and process: a study builds one model per run, and the warning does not change.
        _WARNED_RANDOM.add(model_cfg.backbone)
        logger.warning(
            "model.pretrained is not set: %s starts from random weights, so results reflect training from scratch",
            model_cfg.backbone,
        )
    return model


_WARNED_RANDOM: set[str] = set()
