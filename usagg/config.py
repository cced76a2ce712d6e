"""Study, model, training and evaluation configs; YAML loading with errors that name file and key."""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from usagg.errors import ConfigError
from usagg.tasks import METRICS_BY_KIND, ConfigPath, StrictModel, TaskCard, check_name


class Paradigm(str, Enum):
    task_specific = "task_specific"
    grouped = "grouped"
    unified = "unified"


PARADIGMS = tuple(p.value for p in Paradigm)


def _check_multiple_of_16(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    for side in (height, width):
        if side <= 0 or side % 16:
            raise ValueError(f"image size {side} px is not a positive multiple of the 16 px patch size")
    return height, width


class AugmentConfig(StrictModel):
    """Training-time augmentation; evaluation never augments."""

    enabled: bool = True
    hflip_p: float = Field(default=0.5, ge=0, le=1)
    scale_jitter: float = Field(default=0.1, ge=0, lt=1)  # random resized crop keeps >= 1 - scale_jitter of the area
    brightness: float = Field(default=0.2, ge=0)
    contrast: float = Field(default=0.2, ge=0)
    speckle_sigma: float = Field(default=0.1, ge=0)  # std of multiplicative noise, in units of intensity


class DataConfig(StrictModel):
    """Input geometry, splits and loading shared by every run of a study."""

    img_size: int | tuple[int, int] = Field(
        default=224, description="one side or [height, width] in pixels, multiples of 16"
    )
    resize: Literal["letterbox", "stretch"] = "letterbox"
    augment: AugmentConfig = AugmentConfig()
    val_fraction: float = Field(default=0.15, ge=0, lt=1)  # carved from the training source when it has no val split
    test_fraction: float = Field(default=0.15, ge=0, lt=1)
    split_seed: int = 0
    num_workers: int = Field(default=2, ge=0)
    cache_images: bool = False  # keep decoded images in memory (one copy per DataLoader worker)

    @field_validator("img_size")
    @classmethod
    def _check_size(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        _check_multiple_of_16(value)
        return value

    @model_validator(mode="after")
    def _check_fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction {self.val_fraction} and test_fraction {self.test_fraction} add up to 1 or more, which "
                "leaves no training images; lower them"
            )
        return self

    @property
    def size_hw(self) -> tuple[int, int]:
        return _check_multiple_of_16(self.img_size)


class ModelConfig(StrictModel):
    """M2DINO architecture and fine-tuning options."""

    backbone: Literal[
        "vit_tiny_patch16_dinov3_qkvb",
        "vit_small_patch16_dinov3",
        "vit_small_patch16_dinov3_qkvb",
        "vit_base_patch16_dinov3",
        "vit_base_patch16_dinov3_qkvb",
        "vit_large_patch16_dinov3",
        "vit_large_patch16_dinov3_qkvb",
    ] = "vit_small_patch16_dinov3"
    pretrained: ConfigPath | None = None  # local .pth / .safetensors file; nothing is downloaded
    # Backbone tensors the pretrained file lacks stop the run unless this is true (they then keep random values).
    pretrained_allow_missing: bool = False
    depth: int | None = Field(default=None, ge=1)  # truncate the backbone to this many blocks (tests, tiny runs)
    moe_blocks: list[int] | None = None  # 0-based block indices; default the second half
    num_experts: int = Field(default=8, ge=1)
    top_k: int = Field(default=2, ge=1)
    expert_hidden: int | None = Field(default=None, ge=1)  # default: dense MLP width / top_k (same active FLOPs)
    router: Literal["token_task", "task", "per_task"] = "token_task"
    task_embed_dim: int = Field(default=64, ge=1)
    balance_loss_weight: float = Field(default=0.01, ge=0)
    z_loss_weight: float = Field(default=0.001, ge=0)
    mi_loss_weight: float = Field(default=0.0, ge=0)
    mi_window: int = Field(default=16, ge=1)  # steps whose routing statistics are pooled for the MI loss
    feature_blocks: list[int] | None = None  # 0-based blocks feeding the heads; default 4 evenly spaced
    decoder_dim: int = Field(default=128, ge=8)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    finetune: Literal["full", "frozen", "last_n"] = "full"
    trainable_blocks: int = Field(default=4, ge=0)  # used by finetune: last_n
    layer_decay: float = Field(default=1.0, gt=0, le=1)
    max_boxes: int = Field(default=1, ge=1)  # detection queries; >1 switches to the dense anchor-free head
    # How experts start: "dense_slices" cuts each expert from the block's dense MLP (pretrained when
    # model.pretrained is set), "random" draws them afresh and discards the dense MLP weights.
    expert_init: Literal["dense_slices", "random"] = "dense_slices"
    grad_checkpointing: bool = False  # recompute block activations in the backward pass to save memory

    @model_validator(mode="after")
    def _check_top_k(self) -> "ModelConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        return self


class TrainConfig(StrictModel):
    """Optimiser, schedule and per-task budget, identical across paradigms for a controlled comparison."""

    # How the per-task budget is matched across paradigms:
    #   epochs  - every task sees `epochs` passes over its own training images in every paradigm (default);
    #   samples - every task sees `samples_per_task` training images;
    #   steps   - every run takes `steps` optimiser steps, whatever its number of tasks.
    budget: Literal["epochs", "samples", "steps"] = "epochs"
    epochs: float = Field(default=10.0, gt=0)
    samples_per_task: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr_backbone: float = Field(default=5e-5, ge=0)
    lr_moe: float = Field(default=1e-4, ge=0)
    lr_head: float = Field(default=1e-3, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    loss_weighting: Literal["equal", "uncertainty", "fixed"] = "equal"
    loss_weights: dict[str, float] | None = None  # task -> weight, for loss_weighting: fixed
    task_sampling: Literal["uniform", "proportional", "temperature"] = "proportional"
    temperature: float = Field(default=2.0, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    min_lr_fraction: float = Field(default=0.0, ge=0, le=1)  # cosine decays each group's lr to this fraction of it
    checkpoint_every: int = Field(default=50, ge=1)  # steps between "latest" checkpoints
    eval_every: int | None = Field(default=None, ge=1)  # steps between validations; default: see eval_epochs
    eval_epochs: float = Field(default=1.0, gt=0)  # without eval_every: validate every this many epoch-equivalents
    eval_batch_size: int = Field(default=16, ge=1)
    log_every: int = Field(default=10, ge=1)  # steps between training-log lines (the last step is always logged)
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    deterministic: bool = True  # torch deterministic algorithms (warn-only) and no cuDNN autotuning
    skip_nonfinite: bool = False  # skip batches with a NaN/infinite loss (counted in the log) instead of stopping
    tensorboard: bool = False
    lookahead_every: int | None = Field(default=None, ge=1)  # record lookahead affinity every k steps (unified runs)
    gradient_affinity_every: int | None = Field(default=None, ge=1)  # record task-gradient similarity every k steps
    # Lookahead loss ratio against the loss after a zero-gradient optimizer step (momentum) or the current loss.
    lookahead_reference: Literal["momentum", "current"] = "momentum"
    affinity_batch_size: int | None = Field(default=None, ge=1)  # images per task for affinity records; default batch_size
    fisher_images: int | None = Field(default=None, ge=1)  # images per task for the Fisher affinity at the end of unified training

    @field_validator("amp", mode="before")
    @classmethod
    def _read_yaml_off(cls, value: Any) -> Any:
        # YAML 1.1, which PyYAML reads, turns a bare `off` into the boolean false.
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check_budget(self) -> "TrainConfig":
        if self.budget == "samples" and self.samples_per_task is None:
            raise ValueError("budget 'samples' needs samples_per_task")
        if self.budget == "steps" and self.steps is None:
            raise ValueError("budget 'steps' needs steps")
        if self.loss_weighting == "fixed" and not self.loss_weights:
            raise ValueError("loss_weighting 'fixed' needs loss_weights (task name -> weight)")
        return self


class EvalConfig(StrictModel):
    """How runs are evaluated into the results table."""

    split: Literal["val", "test"] = "test"  # split evaluated at the end of every run
    checkpoint: Literal["best", "latest"] = "best"  # weights evaluated: best validation score or the final step
    # fmc_uia: both masks empty -> Dice 1, HD 0; one empty -> Dice 0, HD = image diagonal.
    # nan: both empty -> every metric NaN; one empty -> Dice 0 and HD NaN. NaN image scores are left out of means.
    empty_mask_policy: Literal["fmc_uia", "nan"] = "fmc_uia"
    # AUC and MCC with one class present in the split: nan (with a logged reason) or skip the metric.
    one_class_policy: Literal["nan", "skip"] = "nan"
    primary_metrics: dict[str, str] | None = None  # task kind -> metric, overriding the defaults
    # Bootstrap replicates of the analysis tables and figures that `usagg reproduce` writes for this study (the
    # analysis commands take --bootstrap, with the same default).
    bootstrap: int = Field(default=2000, ge=0)

    @field_validator("primary_metrics")
    @classmethod
    def _check_primary_metrics(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for kind, metric in (value or {}).items():
            if kind not in METRICS_BY_KIND:
                raise ValueError(f"unknown task kind {kind!r}; kinds: {', '.join(METRICS_BY_KIND)}")
            if metric not in METRICS_BY_KIND[kind]:
                raise ValueError(f"metric {metric!r} is not computed for {kind} tasks; choose one of {', '.join(METRICS_BY_KIND[kind])}")
        return value


class StudyConfig(StrictModel):
    """A whole study: tasks, how to group them, which runs to make and how to train them."""

    name: str
    description: str = ""
    output: ConfigPath = Path("runs")
    tasks: list[TaskCard] = Field(min_length=1)
    groups: dict[str, list[str]] | None = None  # partition for the grouped paradigm; default: clinical groups
    paradigms: list[Paradigm] = Field(default=[Paradigm.task_specific, Paradigm.grouped, Paradigm.unified], min_length=1)
    fractions: list[float] = Field(default=[1.0], min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    pairs: list[tuple[str, str]] | None = None  # task pairs for measured affinity (usagg train --pairs)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvalConfig = EvalConfig()

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_name("study", value)

    @field_validator("seeds", "paradigms")
    @classmethod
    def _check_unique(cls, value: list, info: ValidationInfo) -> list:
        repeated = sorted({str(getattr(v, "value", v)) for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"{info.field_name} lists {', '.join(repeated)} more than once, which would plan the same runs twice")
        return value

    @field_validator("fractions")
    @classmethod
    def _check_fractions(cls, value: list[float]) -> list[float]:
        for fraction in value:
            if not 0 < fraction <= 1:
                raise ValueError(f"data fraction {fraction} is outside (0, 1]")
        return sorted(set(value))

    @model_validator(mode="after")
    def _check_tasks_and_groups(self) -> "StudyConfig":
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {', '.join(duplicates)}")
        known = set(names)
        if self.groups is not None:
            problem = partition_problem(self.groups, names, self.name)
            if problem is not None:
                raise ValueError(problem)
        for pair in self.pairs or []:
            for member in pair:
                if member not in known:
                    raise ValueError(f"pairs: {list(pair)} names unknown task {member!r}")
            if pair[0] == pair[1]:
                raise ValueError(f"pairs: {list(pair)} pairs a task with itself; a pair run needs two tasks")
        return self

    def task(self, name: str) -> TaskCard:
        for card in self.tasks:
            if card.name == name:
                return card
        raise KeyError(f"task {name!r} is not in study {self.name!r}")

    def group_partition(self) -> dict[str, list[str]]:
        """Return the grouped paradigm's partition: the study's ``groups`` or the clinical groups of the cards."""
        if self.groups is not None:
            return {g: list(m) for g, m in self.groups.items()}
        partition: dict[str, list[str]] = {}
        for card in self.tasks:
            partition.setdefault(card.group, []).append(card.name)
        return partition


# --- loading ---------------------------------------------------------------------------------------

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, file: Path, key_path: str = "") -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML document."""
    if isinstance(value, dict):
        return {k: expand_env(v, file, f"{key_path}.{k}" if key_path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, file, key_path + _item_label(i, v)) for i, v in enumerate(value)]
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            # As in the shell, ${VAR:-default} takes the default when VAR is unset or empty.
            if os.environ.get(name) or (name in os.environ and default is None):
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{file}: {key_path}: environment variable {name} is not set; "
                f"set it (for example `export {name}=/path/to/data`) or write the value in the file"
            )

        return _VAR_RE.sub(substitute, value)
    return value


def read_yaml(path: str | os.PathLike) -> Any:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: file not found; check the path and the file name")
    try:
        with open(file, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}: invalid YAML{where}: {problem}") from None


def partition_problem(groups: Mapping[str, Sequence[str]], task_names: Sequence[str], study_name: str) -> str | None:
    """Return the first problem of a ``groups:`` partition (an invalid name, an unknown task, a task in two groups)."""
    seen: dict[str, str] = {}
    for group, members in groups.items():
        # A group name is a folder of the run directory and a part of the run id, as a task name is.
        try:
            check_name("group", str(group))
        except ValueError as exc:
            return f"groups.{group}: {exc}"
        if not members:
            return f"groups.{group}: the group has no tasks; list its tasks or remove it"
        for member in members:
            if member not in task_names:
                return (
                    f"groups.{group}: task {member!r} is not in study {study_name!r}; "
                    f"its tasks are {', '.join(task_names)}"
                )
            if member in seen:
                return f"groups.{group}: task {member!r} is already in group {seen[member]!r}"
            seen[member] = str(group)
    return None


def format_validation_error(
    exc: ValidationError,
    file: Path,
    model: type[BaseModel],
    prefix: str = "",
    overridden: Sequence[str] = (),
    data: Any = None,
) -> str:
    """Render pydantic errors as ``file: key.path: message (got value)`` lines, listing allowed keys for unknown ones.

    ``data`` is the validated input; with it, list items that have a ``name`` are shown by index and name
    (``tasks[4] (nerve).num_clases``). Errors of one value against each member of a union (``img_size``) become
    one line naming the allowed forms, and a bad or missing discriminator (``source.format``) lists the valid
    values. Lines for keys in ``overridden`` (dotted, as written after ``--set``) or below them state that the
    value came from the command line.
    """
    lines = []
    for where, err in _merge_union_errors([(_clean_location(model, err["loc"]), err) for err in exc.errors()]):
        key = prefix + _format_location(where.loc, data) if where.loc else prefix.rstrip(".")
        message = err["msg"]
        show_input = err["type"] != "missing" and _is_scalar(err.get("input"))
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "union_members":
            message = err["msg"]
            show_input = False
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key, message = _discriminator_message(key, where, err)
        elif err["type"] == "extra_forbidden" and where.owner is not None:
            message = f"unknown key; allowed keys here: {', '.join(where.owner.model_fields)}"
        elif err["type"] == "missing":
            message = "required field is missing"
        line = f"{file}: {key}: {message}" if key else f"{file}: {message}"
        if show_input:
            line += f" (got {err['input']!r})"
        dotted = ".".join(str(part) for part in where.loc)
        override = next((o for o in overridden if dotted == o or dotted.startswith(o + ".")), None)
        if override is not None:
            line += f"; this value comes from an override ({override}, --set on the command line), not from the file"
        lines.append(line)
    return "\n".join(lines)


class _Location(typing.NamedTuple):
    """Location of a pydantic error in the validated input, with the tags of union members removed."""

    loc: list[Any]  # keys and list indices of the input
    owner: type[BaseModel] | None  # the model that owns the last key
    node: Any  # what the location holds: a model, a list of tagged models, a plain union, a type, or None
    union: Any = None  # a plain union (int | tuple[int, int]) whose member tag was removed from loc, or None
    union_depth: int = 0  # len(loc) up to and including that union's field
    description: str | None = None  # the description of the union's field


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list, tuple, BaseModel, type(None)))


def _merge_union_errors(errors: list[tuple[_Location, dict]]) -> list[tuple[_Location, dict]]:
    """Replace the errors of one value against every member of a plain union by one error.

    A member may accept the value's shape and fail deeper: ``img_size: [big, 224]`` fails at item 0 of the tuple.
    Then only those deeper errors are kept. Otherwise one ``union_members`` error names the allowed forms.
    """
    merged: list[tuple[_Location, dict]] = []
    groups: dict[tuple, list[tuple[_Location, dict]]] = {}
    for where, err in errors:
        if where.union is None:
            merged.append((where, err))
            continue
        key = tuple(str(p) for p in where.loc[: where.union_depth])
        if key not in groups:
            groups[key] = []
            merged.append((where, {"type": "union_group", "key": key}))
        groups[key].append((where, err))
    result: list[tuple[_Location, dict]] = []
    for where, err in merged:
        if err["type"] != "union_group":
            result.append((where, err))
            continue
        members = groups[err["key"]]
        deeper = [(w, e) for w, e in members if len(w.loc) > w.union_depth]
        if deeper:
            result.extend(deeper)
            continue
        value = members[0][1].get("input")
        forms = " or ".join(_describe_type(t) for t in typing.get_args(where.union) if t is not type(None))
        text = f"must be {forms}" + (f" ({where.description})" if where.description else "")
        value_text = repr(value)
        text += f"; got {value_text}" if len(value_text) <= 80 else ""
        result.append((where._replace(loc=where.loc[: where.union_depth]), {"type": "union_members", "msg": text}))
    return result


def _discriminator_message(key: str, where: _Location, err: dict) -> tuple[str, str]:
    """Key and message for a tagged union whose tag (``format``) is missing or names no member."""
    ctx = err.get("ctx") or {}
    discriminator = str(ctx.get("discriminator", "format")).strip("'\"")
    tags = [_tag_of(m) for m in where.node] if isinstance(where.node, list) else []
    tags = [t for t in tags if t] or re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
    noun = f"{where.loc[-1]} {discriminator}" if where.loc and isinstance(where.loc[-1], str) else discriminator
    allowed = f"valid {noun}s: {', '.join(tags)}"
    key = f"{key}.{discriminator}" if key else discriminator
    if err["type"] == "union_tag_not_found":
        return key, f"required field is missing; {allowed}"
    return key, f"unknown {noun} {ctx.get('tag')!r}; {allowed}"


_TYPE_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
               bool: ("true or false", "booleans"), Path: ("a path", "paths")}


def _describe_type(annotation: Any, plural: bool = False) -> str:
    """Describe a type for a config author: ``an integer``, ``a list of 2 integers``, ``one of 'a', 'b'``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _describe_type(args[0], plural)
    if annotation in _TYPE_WORDS:
        return _TYPE_WORDS[annotation][1 if plural else 0]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and Ellipsis not in args:
            items = f"{len(args)} {_describe_type(args[0], plural=True)}" if len(set(args)) == 1 else "items"
        else:
            items = _describe_type(args[0], plural=True) if args else "items"
        return ("lists of " if plural else "a list of ") + items
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "mappings" if plural else "a mapping of keys to values"
    return getattr(annotation, "__name__", str(annotation))


def _item_label(index: int, item: Any) -> str:
    """``[4]``, or ``[4] (nerve)`` for a list item with a name."""
    name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None) if isinstance(item, BaseModel) else None
    return f"[{index}] ({name})" if isinstance(name, str) and name else f"[{index}]"


def _format_location(loc: list[Any], data: Any = None) -> str:
    text = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            item = node[part] if isinstance(node, list) and -len(node) <= part < len(node) else None
            text += _item_label(part, item)
            node = item
        else:
            text += f".{part}" if text else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text


def _is_plain_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _clean_location(model: type[BaseModel], loc: tuple[Any, ...]) -> _Location:
    """Drop union member tags from ``loc`` and find the model that owns its last key."""
    cleaned: list[Any] = []
    current: Any = model
    owner: type[BaseModel] | None = None
    field = None
    union: Any = None
    union_depth = 0
    description = None
    for part in loc:
        if isinstance(part, int):
            cleaned.append(part)
            continue
        if isinstance(current, list):  # a union of models: this part is the tag that picked one
            match = [m for m in current if _tag_of(m) == part]
            if match:
                current = match[0]
                continue
        # In a plain union such as int | tuple[int, int], pydantic adds the name of the member it tried to loc.
        if _is_plain_union(current) and union is None:
            union, union_depth = current, len(cleaned)
            description = field.description if field is not None else None
            current = None
            continue
        cleaned.append(part)
        if isinstance(current, type) and issubclass(current, BaseModel):
            owner = current
            field = current.model_fields.get(str(part))
            current = _unwrap(field.annotation) if field is not None else None
        else:
            current = None
    return _Location(cleaned, owner, current, union, union_depth, description)


def _tag_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("format")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if args else None


def _unwrap(annotation: Any) -> Any:
    """Reduce Optional/list/dict/Annotated wrappers to the model class inside, or a list of union members."""
    for _ in range(6):
        origin = typing.get_origin(annotation)
        if origin is None:
            return annotation
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin is typing.Annotated:
            annotation = args[0]
            continue
        if origin in (list, tuple):
            annotation = args[0] if args else annotation
            continue
        if origin is dict:
            annotation = args[1]
            continue
        if len(args) == 1:
            annotation = args[0]
            continue
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            annotation = models[0]
            continue
        return models or annotation
    return annotation


def load_task_card(path: str | os.PathLike) -> TaskCard:
    """Load one task card from its own YAML file; its paths are relative to that file."""
    file = Path(path).resolve()
    raw = expand_env(read_yaml(file), file)
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: a task card must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return TaskCard.model_validate(raw, context={"base_dir": file.parent})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, file, TaskCard, data=raw)) from None


def _flatten(mapping: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Return ``{"prefix.key.sub": value}`` for every leaf of a nested mapping."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def load_study(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Load and validate a study YAML.

    ``tasks`` entries may be task cards written inline or paths to card files. ``overrides`` maps dotted
    keys (``train.epochs``) to values applied before validation; a mapping value sets each of its keys.
    """
    file = Path(path).resolve()
    raw = read_yaml(file)
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: a study must be a mapping of keys to values, got {type(raw).__name__}")
    raw = expand_env(raw, file)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(
            f"overrides must be a mapping of dotted keys to values, e.g. {{'train.epochs': 2}}; got {type(overrides).__name__}"
        )
    for dotted, value in (overrides or {}).items():
        if isinstance(value, Mapping):
            # A mapping value sets each of its keys, so {"model": {"depth": 2}} keeps the other model settings.
            for key, item in _flatten(value, str(dotted)).items():
                _set_dotted(raw, key, item)
        else:
            _set_dotted(raw, dotted, value)
    tasks = raw.get("tasks")
    if isinstance(tasks, list):
        resolved = []
        for i, item in enumerate(tasks):
            if isinstance(item, str):
                card_file = Path(item)
                if not card_file.is_absolute():
                    card_file = file.parent / card_file
                try:
                    resolved.append(load_task_card(card_file))
                except ConfigError as exc:
                    raise ConfigError(f"{file}: tasks[{i}]: {exc}") from None
            else:
                resolved.append(item)
        raw["tasks"] = resolved
    try:
        study = StudyConfig.model_validate(raw, context={"base_dir": file.parent})
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, file, StudyConfig, overridden=list(overrides or {}), data=raw)
        ) from None
    for dotted, value in (overrides or {}).items():
        _resolve_override_path(study, dotted, value)
    return study


def _resolve_override_path(study: StudyConfig, dotted: str, value: Any) -> None:
    """Take a relative path given as an override from the current folder, as a shell user expects.

    Validation resolved it against the study file's folder, like the paths written in the YAML.
    """
    if not isinstance(value, str) or Path(value).expanduser().is_absolute():
        return
    *parents, last = dotted.split(".")
    node: Any = study
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else getattr(node, part, None)
        if node is None:
            return
    if isinstance(node, BaseModel) and isinstance(getattr(node, last, None), Path):
        setattr(node, last, Path.cwd() / Path(value).expanduser())


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``value`` at a dotted key of the raw study; a number after a list selects its item (``tasks.0.name``)."""
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the study"
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                rest = ".".join(parts[depth + 1:]) or "KEY"
                raise ConfigError(
                    f"--set {dotted}: {where} is a list of {len(node)} item(s), so the next part must be an index "
                    f"from 0 to {len(node) - 1}, got {part!r} (for example --set {where}.0.{rest}=VALUE)"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            raise ConfigError(
                f"--set {dotted}: {where} is a single value ({node!r}), so it has no key {part!r}; "
                f"set {where} itself (--set {where}=VALUE)"
            )


def study_to_yaml(study: StudyConfig) -> str:
    """Serialise a resolved study (absolute paths, defaults filled in), as written into every run directory."""
    return yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
