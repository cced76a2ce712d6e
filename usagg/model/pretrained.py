"""Load backbone weights from a local file: the official DINOv3 checkpoint, a timm file or an M2DINO checkpoint.

Nothing is downloaded. Official DINOv3 keys (``storage_tokens``, ``ls1.gamma``, a fused ``qkv.bias`` ...) are
mapped to timm's names by timm's own ``timm.models.eva.checkpoint_filter_fn``. The dense MLP weights of
blocks that M2DINO turns into MoE layers are cut into experts (see ``MoEMlp.load_dense``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from usagg.errors import ConfigError

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("teacher", "student", "model_ema", "model", "module", "state_dict")
STRIPPED_PREFIXES = ("module.", "backbone.")
M2DINO_PREFIX = "backbone.vit."
DENSE_MLP_KEYS = ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass
class LoadReport:
    """Outcome of a :func:`load_pretrained` call: the tensors loaded, missing, unused and newly initialised."""

    path: Path
    source_format: str  # "official_dinov3", "timm" or "m2dino"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone tensors the file lacks (left at their initial values)
    unexpected: list[str] = field(default_factory=list)  # tensors in the file that the model has no place for
    new_parameters: list[str] = field(default_factory=list)  # MoE routers and experts with no counterpart in the file
    experts_from_dense: list[int] = field(default_factory=list)  # MoE blocks whose experts were cut from the file's MLP

    def summary(self) -> dict[str, object]:
        """Return what run.json records of the load: the file, its size, the layout and the tensor counts."""
        return {
            "path": str(self.path.resolve()),
            "bytes": self.path.stat().st_size,
            "format": self.source_format,
            "loaded": len(self.loaded),
            "missing": self.missing,
            "unexpected": len(self.unexpected),
            "new_moe_tensors": len(self.new_parameters),
            "experts_from_dense": self.experts_from_dense,
        }


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file into a flat ``{name: tensor}`` dict.

    Training checkpoints are unwrapped (``teacher``, ``model``, ``state_dict`` ...), and ``module.`` and
    ``backbone.`` prefixes are removed, except the ``backbone.vit.`` prefix of M2DINO checkpoints.
    """
    file = check_weights_file(path)
    try:
        if file.suffix.lower() == ".safetensors" or _is_safetensors(file):
            from safetensors.torch import load_file

            raw = load_file(str(file), device="cpu")
        else:
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many different types
        # torch's message for a pickle it rejects runs to many lines and suggests weights_only=False, which
        # would run arbitrary code from the file. Its first line names what failed.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.pretrained: cannot read {file} as a weights file: {first_line}; give an unmodified .safetensors "
            "file, or a .pth file that holds only tensors"
        ) from exc

    for _ in range(3):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(raw, dict) and isinstance(raw.get(k), dict)), None)
        if wrapper is None:
            break
        raw = raw[wrapper]
    if not isinstance(raw, dict):
        raise ConfigError(f"model.pretrained: {file} does not contain a state dict (found {type(raw).__name__})")

    state_dict = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not key.startswith(M2DINO_PREFIX):
            for prefix in STRIPPED_PREFIXES:
                key = key.removeprefix(prefix)
        state_dict[key] = value
    if not state_dict:
        raise ConfigError(f"model.pretrained: {file} contains no tensors")
    return state_dict


def check_weights_file(path: str | os.PathLike) -> Path:
    """Return ``path`` if it names an existing file with a weights suffix; raise ConfigError saying what is wrong."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"model.pretrained: {file} is a folder; give the path of the .pth or .safetensors file in it")
    if not file.is_file():
        raise ConfigError(f"model.pretrained: file {file} not found; give the path of a local .pth or .safetensors file")
    if file.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ConfigError(
            f"model.pretrained: {file} has suffix {file.suffix.lower()!r}; expected {', '.join(WEIGHT_SUFFIXES)}"
        )
    return file


def _is_safetensors(file: Path) -> bool:
    """Tell a safetensors file saved under another suffix by its header: an 8-byte length, then a JSON object."""
    with open(file, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], "little") <= file.stat().st_size and head[8:9] == b"{"


def to_timm_state_dict(state_dict: dict[str, torch.Tensor], vit: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Map a checkpoint's keys to timm's Eva names; return the mapped dict and the detected source format."""
    if any(k.startswith(M2DINO_PREFIX) for k in state_dict):
        return {k[len(M2DINO_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(M2DINO_PREFIX)}, "m2dino"

    from timm.models.eva import checkpoint_filter_fn

    source_format = "official_dinov3" if "storage_tokens" in state_dict else "timm"
    # timm's filter prints (instead of logging) when a fused qkv bias has no place in a model without
    # q/v biases, as in the non-"_qkvb" variants whose released biases are zero. Keep that out of stdout.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        mapped = checkpoint_filter_fn(dict(state_dict), vit)
    if captured.getvalue().strip():
        logger.debug("timm checkpoint filter: %s", captured.getvalue().strip())
    return mapped, source_format


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, expert_init: str | None = None, allow_missing: bool | None = None
) -> LoadReport:
    """Load local backbone weights into an M2DINO model (or a ``DinoBackbone`` or timm Eva).

    Unused tensors of the file are logged and returned. A backbone tensor the file lacks raises ConfigError
    unless ``allow_missing`` (then it is logged and keeps its initial value), and so does a tensor whose shape
    differs from the model's, naming the key and both shapes. ``expert_init`` ("dense_slices" or "random") and
    ``allow_missing`` default to the model config's choices.
    """
    file = Path(path)
    vit = _find_vit(model)
    cfg = getattr(model, "cfg", None)
    if expert_init is None:
        expert_init = getattr(cfg, "expert_init", "dense_slices")
    if allow_missing is None:
        allow_missing = getattr(cfg, "pretrained_allow_missing", False)
    state_dict, source_format = to_timm_state_dict(read_state_dict(file), vit)
    report = LoadReport(path=file, source_format=source_format)

    from usagg.model.moe import MoEMlp

    for index, block in enumerate(vit.blocks):
        if not isinstance(block.mlp, MoEMlp):
            continue
        keys = [f"blocks.{index}.{name}" for name in DENSE_MLP_KEYS]
        if not all(k in state_dict for k in keys):
            continue
        dense = [state_dict.pop(k) for k in keys]
        if expert_init == "dense_slices":
            _check_dense_shapes(block.mlp, keys, dense, file, _dense_hidden(vit))
            block.mlp.load_dense(*[t.float() for t in dense])
            report.experts_from_dense.append(index)
        else:
            report.unexpected.extend(keys)

    expected = vit.state_dict()
    for key, value in state_dict.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            if ".mlp." in key and isinstance(_block_mlp(vit, key), MoEMlp):
                fix = "the checkpoint's MoE layers differ, so set model.num_experts, model.top_k and model.expert_hidden to match it"
            else:
                fix = "the checkpoint is for another architecture, so set model.backbone (and model.depth) to match it"
            raise ConfigError(
                f"model.pretrained: {file}: tensor {key!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(expected[key].shape)} in the model; {fix}"
            )
    result = vit.load_state_dict(state_dict, strict=False)
    report.unexpected.extend(result.unexpected_keys)
    filled = {f"blocks.{i}.mlp.{n}" for i in report.experts_from_dense for n in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")}
    for key in result.missing_keys:
        if key in filled:
            continue
        if ".mlp." in key and isinstance(_block_mlp(vit, key), MoEMlp):
            report.new_parameters.append(key)
        else:
            report.missing.append(key)
    report.loaded = sorted(k for k in state_dict if k in expected) + sorted(filled)

    logger.info(
        "loaded %d tensors from %s (%s layout); experts cut from the dense MLP in blocks %s",
        len(report.loaded), file, source_format, report.experts_from_dense or "none",
    )
    if report.missing and not allow_missing:
        raise ConfigError(
            f"model.pretrained: {file} lacks {len(report.missing)} tensor(s) of {vit.__class__.__name__} "
            f"{getattr(model, 'cfg', None) and model.cfg.backbone or ''}: {_preview(report.missing)}; the file is "
            "probably for another architecture, so give a DINOv3 checkpoint of model.backbone, or set "
            "model.pretrained_allow_missing: true to keep those tensors at their random initial values"
        )
    if report.missing:
        logger.warning("%d backbone tensors missing from %s, left at their initial values: %s", len(report.missing), file, _preview(report.missing))
    if report.unexpected:
        logger.warning("%d tensors in %s were not used: %s", len(report.unexpected), file, _preview(report.unexpected))
    if report.new_parameters:
        logger.info("%d new MoE tensors start from random values: %s", len(report.new_parameters), _preview(report.new_parameters))
    return report


def _find_vit(model: nn.Module) -> nn.Module:
    if hasattr(model, "backbone") and hasattr(model.backbone, "vit"):
        return model.backbone.vit
    if hasattr(model, "vit"):
        return model.vit
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return model
    raise TypeError(f"load_pretrained expects an M2DINO, DinoBackbone or timm Eva model, got {type(model).__name__}")


def _dense_hidden(vit: nn.Module) -> int:
    """Return the hidden width of the backbone's dense MLPs (timm's mlp_ratio times the embedding width)."""
    from usagg.model.moe import MoEMlp

    for block in vit.blocks:
        if not isinstance(block.mlp, MoEMlp):
            return int(block.mlp.fc1.out_features)
    return int(getattr(vit.blocks[0].mlp, "dense_hidden", 4 * vit.embed_dim))  # 4: timm's default mlp_ratio


def _block_mlp(vit: nn.Module, key: str) -> nn.Module | None:
    parts = key.split(".")
    if parts[0] != "blocks":
        return None
    return vit.blocks[int(parts[1])].mlp


def _check_dense_shapes(moe: nn.Module, keys: list[str], dense: list[torch.Tensor], file: Path, dense_hidden: int) -> None:
    expected = [(dense_hidden, moe.dim), (dense_hidden,), (moe.dim, dense_hidden), (moe.dim,)]
    for key, tensor, shape in zip(keys, dense, expected):
        if tuple(tensor.shape) != shape:
            raise ConfigError(
                f"model.pretrained: {file}: tensor {key!r} has shape {tuple(tensor.shape)} in the file but the "
                f"model's dense MLP, which the MoE layer's experts are cut from, has {shape}; set model.backbone "
                "to the checkpoint's architecture"
            )


def _preview(keys: list[str], limit: int = 8) -> str:
    listed = ", ".join(keys[:limit])
    return listed + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
