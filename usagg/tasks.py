"""Task cards: what a task predicts, which clinical group it belongs to and where its data lives."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.functional_validators import AfterValidator, BeforeValidator


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the folder of the file that declared it."""
    base = (info.context or {}).get("base_dir")
    value = Path(value).expanduser()
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


def _reject_empty(value: Any) -> Any:
    # Path("") is ".", the file's own folder, so an empty value would pass silently and fail much later.
    if isinstance(value, str) and not value.strip():
        raise ValueError("the path is empty; write a folder or file (an empty ${VAR} also gives this)")
    return value


# A filesystem path from a config file; relative paths are taken relative to that file's folder.
ConfigPath = Annotated[Path, BeforeValidator(_reject_empty), AfterValidator(_resolve_path)]


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TaskType(str, Enum):
    segmentation = "segmentation"
    classification = "classification"
    detection = "detection"
    regression = "regression"


# Primary metric per task type and regression kind, and the direction of every metric usagg reports.
DEFAULT_PRIMARY_METRIC = {
    "segmentation": "dice",
    "classification": "auc",
    "detection": "iou",
    "keypoints": "mre_px",
    "scalar": "mae",
}

# Metrics ``usagg evaluate`` computes for each head kind (``TaskCard.kind``).
METRICS_BY_KIND: dict[str, tuple[str, ...]] = {
    "segmentation": ("dice", "hd", "hd95", "hd_mm", "hd95_mm"),
    "classification": ("auc", "accuracy", "f1_macro", "f1_weighted", "mcc"),
    "detection": ("iou", "map50"),
    "keypoints": ("mre_px", "mre_mm"),
    "scalar": ("mae", "rmse", "r2"),
}

HIGHER_IS_BETTER = {
    "dice": True,
    "hd": False,
    "hd95": False,
    "hd_mm": False,
    "hd95_mm": False,
    "auc": True,
    "accuracy": True,
    "f1_macro": True,
    "f1_weighted": True,
    "mcc": True,
    "iou": True,
    "map50": True,
    "mre_px": False,
    "mre_mm": False,
    "mae": False,
    "rmse": False,
    "r2": True,
}


def metric_higher_is_better(metric: str) -> bool:
    """Return the direction of ``metric``; unknown metrics raise ``KeyError`` naming the known ones."""
    try:
        return HIGHER_IS_BETTER[metric]
    except KeyError:
        known = ", ".join(sorted(HIGHER_IS_BETTER))
        raise KeyError(f"unknown metric {metric!r}; known metrics: {known}") from None


# --- data sources --------------------------------------------------------------------------------


class _SourceBase(StrictModel):
    root: ConfigPath
    # Optional separate roots with the same layout for the validation and test splits.
    val_root: ConfigPath | None = None
    test_root: ConfigPath | None = None
    # Pixel spacing applied to every image of the source when neither the file nor a column gives one.
    pixel_spacing_mm: float | None = Field(default=None, gt=0)
    # Regular expression applied to each image's file stem; its first group is the case (patient) id, which keeps
    # all images of a case in one split. Example for HC18 names such as 010_2HC: '^(\d+)_'.
    case_regex: str | None = None

    @field_validator("case_regex")
    @classmethod
    def _check_case_regex(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"case_regex {value!r} is not a valid regular expression: {exc}") from None
        if compiled.groups < 1:
            raise ValueError(f"case_regex {value!r} needs one capturing group, e.g. '^(\\d+)_'")
        return value


class FmcUiaSource(_SourceBase):
    """FMC_UIA challenge layout: ``root/csv_files/*.csv`` with paths relative to ``csv_files/``."""

    format: Literal["fmc_uia"]
    # Value of the ``task_id`` column to read; defaults to the task card's name.
    task_id: str | None = None
    # Optional CSV (relative to root) giving a pixel spacing per image, e.g. the sample's provenance.csv.
    spacing_csv: str | None = None
    spacing_path_column: str = "image_path"  # same relative path as the task CSV's image_path
    spacing_column: str = "pixel_size_mm"


class MaskFolderSource(_SourceBase):
    """``root/images`` and ``root/masks`` matched by file stem (after removing the given prefixes)."""

    format: Literal["mask_folder"]
    images: str = "images"
    masks: str = "masks"
    image_prefix: str = ""
    mask_prefix: str = ""
    mask_suffix: str = ""
    # Optional CSV (relative to root) naming the split of each image: a path or file-name column and a split column.
    split_csv: str | None = None
    split_path_column: str = "image"
    split_column: str = "split"
    # Optional CSV (relative to root) giving a pixel spacing per image: a path or file-name column and a spacing
    # column, e.g. HC18's labels.csv (image, pixel_size_mm). Images it does not list keep pixel_spacing_mm.
    spacing_csv: str | None = None
    spacing_path_column: str = "image"
    spacing_column: str = "pixel_size_mm"


class ClassCsvSource(_SourceBase):
    """A CSV with an image path column and an integer label column."""

    format: Literal["class_csv"]
    csv: str = "labels.csv"
    path_column: str = "path"
    label_column: str = "label"
    case_column: str | None = None
    split_column: str | None = None


class ClassFoldersSource(_SourceBase):
    """One sub-folder per class (``root/<class>/*.png``); class order is the sorted folder names unless given."""

    format: Literal["class_folders"]
    classes: list[str] | None = None


class CocoSource(_SourceBase):
    """COCO detection annotations (one or several boxes per image)."""

    format: Literal["coco"]
    annotations: str = "annotations.json"
    images: str = "images"


class KeypointCsvSource(_SourceBase):
    """A CSV with an image path column and one x and one y column per point."""

    format: Literal["keypoint_csv"]
    csv: str = "keypoints.csv"
    path_column: str = "path"
    # Column pairs, one per point; defaults to ``x1,y1,x2,y2,...``.
    point_columns: list[tuple[str, str]] | None = None
    case_column: str | None = None
    split_column: str | None = None
    spacing_column: str | None = None


class ScalarCsvSource(_SourceBase):
    """A CSV with an image path column, a value column and optionally unit and pixel spacing."""

    format: Literal["scalar_csv"]
    csv: str = "values.csv"
    path_column: str = "path"
    value_column: str = "value"
    unit_column: str | None = None
    spacing_column: str | None = None
    case_column: str | None = None
    split_column: str | None = None


SourceConfig = Annotated[
    Union[
        FmcUiaSource,
        MaskFolderSource,
        ClassCsvSource,
        ClassFoldersSource,
        CocoSource,
        KeypointCsvSource,
        ScalarCsvSource,
    ],
    Field(discriminator="format"),
]

SOURCE_FORMATS = ("fmc_uia", "mask_folder", "class_csv", "class_folders", "coco", "keypoint_csv", "scalar_csv")

# Source formats that hold the labels of each head kind (``TaskCard.kind``).
FORMATS_BY_KIND: dict[str, tuple[str, ...]] = {
    "segmentation": ("fmc_uia", "mask_folder"),
    "classification": ("fmc_uia", "class_csv", "class_folders"),
    "detection": ("fmc_uia", "coco"),
    "keypoints": ("fmc_uia", "keypoint_csv"),
    "scalar": ("scalar_csv",),
}

# Study, task and group names become folders of run directories and parts of run ids.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(what: str, value: str) -> str:
    """Return ``value`` if it is a valid folder name (``NAME_RE``); raise ``ValueError`` naming ``what`` otherwise."""
    if not NAME_RE.match(value):
        raise ValueError(
            f"{what} name {value!r} must start with a letter or digit and contain only letters, digits, '_', '-' or '.'"
        )
    return value


class TaskCard(StrictModel):
    """One dataset and one prediction target."""

    name: str
    type: TaskType
    organ: str = "unknown"
    group: str = Field(default="", description="clinical group used by the grouped paradigm")
    # segmentation: classes including background; classification: classes; detection: object classes.
    num_classes: int | None = Field(default=None, ge=1)
    # keypoint regression: number of points; scalar regression sets ``target`` instead.
    num_keypoints: int | None = Field(default=None, ge=1)
    target: str | None = None
    unit: str | None = None
    class_names: list[str] | None = None
    metric: str | None = None
    # Horizontal flips are allowed unless they change the meaning of a label (keypoint order, left/right).
    allow_hflip: bool | None = None
    allow_vflip: bool = False
    source: SourceConfig | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_name("task", value)

    @field_validator("group")
    @classmethod
    def _check_group(cls, value: str) -> str:
        return check_name("group", value) if value else value

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, value: str | None) -> str | None:
        if value is not None and value not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown metric {value!r}; allowed: {', '.join(sorted(HIGHER_IS_BETTER))}")
        return value

    @model_validator(mode="after")
    def _check_type_fields(self) -> "TaskCard":
        if not self.group:
            self.group = self.organ
        if self.type is TaskType.segmentation:
            if self.num_classes is None or self.num_classes < 2:
                raise ValueError("segmentation tasks need num_classes >= 2 (including background)")
        elif self.type is TaskType.classification:
            if self.num_classes is None or self.num_classes < 2:
                raise ValueError("classification tasks need num_classes >= 2")
        elif self.type is TaskType.detection:
            if self.num_classes is None:
                self.num_classes = len(self.class_names) if self.class_names else 1
        elif self.type is TaskType.regression:
            if (self.num_keypoints is None) == (self.target is None):
                raise ValueError(
                    "regression tasks need exactly one of num_keypoints (keypoint regression) "
                    "or target (scalar regression, e.g. target: head_circumference_mm)"
                )
        if self.class_names is not None and self.num_classes is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}")
        if self.metric is not None and self.metric not in METRICS_BY_KIND[self.kind]:
            raise ValueError(
                f"metric {self.metric!r} is not computed for {self.kind} tasks; choose one of "
                f"{', '.join(METRICS_BY_KIND[self.kind])}"
            )
        if self.source is not None and self.source.format not in FORMATS_BY_KIND[self.kind]:
            what = {"keypoints": "keypoint regression", "scalar": "scalar regression"}.get(self.kind, self.kind)
            raise ValueError(
                f"source format {self.source.format!r} has no {what} labels; a {what} task reads "
                f"{' or '.join(repr(f) for f in FORMATS_BY_KIND[self.kind])}: change the card's type or its source"
            )
        return self

    @property
    def kind(self) -> str:
        """Head kind: the task type, with regression split into ``keypoints`` and ``scalar``."""
        if self.type is TaskType.regression:
            return "keypoints" if self.num_keypoints is not None else "scalar"
        return self.type.value

    @property
    def primary_metric(self) -> str:
        return self.metric or DEFAULT_PRIMARY_METRIC[self.kind]

    @property
    def hflip_allowed(self) -> bool:
        if self.allow_hflip is not None:
            return self.allow_hflip
        return self.kind != "keypoints"
