"""Tasks of the synthetic benchmark, the latent factors behind their labels, their relations and the presets.

Relations are known by construction. Each task lists the latent factors its label depends on (``factors``) and
the factors that vary in its images but must not change its label (``nuisance``). The ground-truth relatedness
of two tasks is then

    r(i, j) = 0.2 [same image domain] + 0.2 [same structure] + 0.5 J(F_i, F_j) - 0.8 [F_i meets N_j or F_j meets N_i]

clipped to [-1, 1], with r(i, i) = 1. J is the Jaccard index of the factor sets. The last term marks a
conflict: one task's label depends on a feature that the other task must be invariant to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from usagg.data.synthetic.organs import ORGANS

TaskKind = Literal["segmentation", "classification", "detection", "keypoints", "scalar"]

# Weights of the relatedness formula in the module docstring.
SAME_DOMAIN_WEIGHT = 0.2
SAME_STRUCTURE_WEIGHT = 0.2
SHARED_FACTOR_WEIGHT = 0.5
CONFLICT_WEIGHT = 0.8

MULTI_ORGAN = "multi_organ"  # organ value of tasks whose images come from every organ


@dataclass(frozen=True)
class SyntheticTask:
    """One task of the benchmark: what its label is, which scenes its images come from, what it depends on."""

    name: str
    kind: TaskKind
    organ: str  # scene generator (a key of ORGANS) or MULTI_ORGAN
    group: str  # clinical group
    description: str
    factors: frozenset[str]
    nuisance: frozenset[str] = frozenset()
    structure: str | None = None  # the anatomical structure the label describes
    num_classes: int | None = None  # segmentation (with background) and classification
    class_names: tuple[str, ...] | None = None
    label_latent: str | None = None  # classification: the latent factor holding the class index
    num_keypoints: int | None = None
    value_latent: str | None = None  # scalar regression
    target: str | None = None
    unit: str | None = None
    # Options passed to the organ's sampler, e.g. {"lesion_prob": 0.5}.
    scene_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def task_type(self) -> str:
        """Task type as in task cards: keypoint and scalar regression are both ``regression``."""
        return "regression" if self.kind in ("keypoints", "scalar") else self.kind

    @property
    def fmc_task_name(self) -> str | None:
        """``task_name`` column value in the FMC_UIA layout; scalar tasks have none (written as scalar CSV)."""
        return {
            "segmentation": "segmentation",
            "classification": "classification",
            "detection": "detection",
            "keypoints": "Regression",
        }.get(self.kind)

    @property
    def organs(self) -> tuple[str, ...]:
        return tuple(ORGANS) if self.organ == MULTI_ORGAN else (self.organ,)


def _f(*names: str) -> frozenset[str]:
    return frozenset(names)


TASKS: tuple[SyntheticTask, ...] = (
    # Breast: one lesion per image in a linear scan.
    SyntheticTask(
        name="breast_lesion_seg", kind="segmentation", organ="breast", group="breast",
        description="Segment the breast lesion.",
        factors=_f("breast.lesion_extent", "breast.lesion_margin"), structure="breast_lesion",
        num_classes=2, class_names=("background", "lesion"),
    ),
    SyntheticTask(
        name="breast_lesion_det", kind="detection", organ="breast", group="breast",
        description="Box around the breast lesion (tight box of its mask).",
        factors=_f("breast.lesion_extent"), structure="breast_lesion", num_classes=1,
    ),
    SyntheticTask(
        name="breast_malignancy_cls", kind="classification", organ="breast", group="breast",
        description="Benign (0) or malignant (1): malignant exactly when the margin irregularity index exceeds 0.11.",
        factors=_f("breast.lesion_margin"), nuisance=_f("breast.density"), structure="breast_lesion",
        num_classes=2, class_names=("benign", "malignant"), label_latent="malignant",
    ),
    SyntheticTask(
        name="breast_density_cls", kind="classification", organ="breast", group="breast",
        description="Tissue composition: fatty (0), heterogeneous (1) or dense (2) fibroglandular background.",
        factors=_f("breast.density"), structure="breast_parenchyma",
        num_classes=3, class_names=("fatty", "heterogeneous", "dense"), label_latent="density",
        scene_options={"lesion_prob": 0.5, "balance_density": True},
    ),
    # Obstetrics: fetal head in a convex scan.
    SyntheticTask(
        name="fetal_head_seg", kind="segmentation", organ="fetal_head", group="obstetrics",
        description="Segment the fetal head (inside the outer skull boundary).",
        factors=_f("fetal.head_pose", "fetal.head_size"), structure="fetal_skull",
        num_classes=2, class_names=("background", "head"),
    ),
    SyntheticTask(
        name="fetal_head_axis", kind="keypoints", organ="fetal_head", group="obstetrics",
        description="End points of the major axis of the outer skull ellipse (point 1 has the smaller x).",
        factors=_f("fetal.head_pose", "fetal.head_size"), structure="fetal_skull", num_keypoints=2,
    ),
    SyntheticTask(
        name="fetal_hc_mm", kind="scalar", organ="fetal_head", group="obstetrics",
        description="Head circumference in mm: perimeter of the outer skull ellipse.",
        factors=_f("fetal.head_size"), structure="fetal_skull",
        value_latent="hc_mm", target="head_circumference_mm", unit="mm",
    ),
    # Cardiac: apical four-chamber view from a phased array.
    SyntheticTask(
        name="cardiac_chamber_seg", kind="segmentation", organ="heart", group="cardiac",
        description="Segment the four chamber cavities.",
        factors=_f("cardiac.chamber_layout", "cardiac.lv_size"), structure="heart_chambers",
        num_classes=5, class_names=ORGANS["heart"].class_names,
    ),
    SyntheticTask(
        name="cardiac_lv_dilation_cls", kind="classification", organ="heart", group="cardiac",
        description="Left ventricle normal (0) or dilated (1): dilated exactly when its size scale exceeds 1.06.",
        factors=_f("cardiac.lv_size"), structure="heart_chambers",
        num_classes=2, class_names=("normal", "dilated"), label_latent="lv_dilated",
    ),
    # Thyroid: transverse linear scan of one lobe; receive gain varies widely in every image.
    SyntheticTask(
        name="thyroid_nodule_seg", kind="segmentation", organ="thyroid", group="thyroid",
        description="Segment the thyroid nodule.",
        factors=_f("thyroid.nodule_extent"), structure="thyroid_nodule",
        num_classes=2, class_names=("background", "nodule"),
    ),
    SyntheticTask(
        name="thyroid_echogenicity_cls", kind="classification", organ="thyroid", group="thyroid",
        description="Nodule echogenicity relative to the gland: hyperechoic (0) or hypoechoic (1).",
        factors=_f("thyroid.nodule_echogenicity"), nuisance=_f("thyroid.gain"), structure="thyroid_nodule",
        num_classes=2, class_names=("hyperechoic", "hypoechoic"), label_latent="hypoechoic",
    ),
    SyntheticTask(
        name="thyroid_gain_qc_cls", kind="classification", organ="thyroid", group="thyroid",
        description="Acquisition quality: receive gain too low (0) or too high (1).",
        factors=_f("thyroid.gain"), num_classes=2, class_names=("under_gain", "over_gain"), label_latent="over_gain",
    ),
    # Vascular: transverse linear scan of an artery and its vein.
    SyntheticTask(
        name="vessel_seg", kind="segmentation", organ="vessel", group="vascular",
        description="Segment the artery with its wall (1) and the vein lumen (2).",
        factors=_f("vessel.layout", "vessel.artery_lumen"), structure="vessels",
        num_classes=3, class_names=ORGANS["vessel"].class_names,
    ),
    SyntheticTask(
        name="vessel_diameter_kp", kind="keypoints", organ="vessel", group="vascular",
        description="Near-wall (1) and far-wall (2) points of the artery lumen on the vertical through its centre.",
        factors=_f("vessel.artery_lumen"), structure="vessels", num_keypoints=2,
    ),
    # Every organ: which anatomy is shown.
    SyntheticTask(
        name="organ_cls", kind="classification", organ=MULTI_ORGAN, group="multi_organ",
        description="Which anatomy the image shows: breast, fetal head, heart, thyroid or vessels.",
        factors=_f("organ.identity"), num_classes=len(ORGANS), class_names=tuple(ORGANS),
    ),
)

TASK_BY_NAME: dict[str, SyntheticTask] = {task.name: task for task in TASKS}


# --- relations -------------------------------------------------------------------------------------


def _same_domain(a: SyntheticTask, b: SyntheticTask) -> bool:
    return a.organ == b.organ or MULTI_ORGAN in (a.organ, b.organ)


def relation(a: SyntheticTask, b: SyntheticTask) -> float:
    """Ground-truth relatedness of two tasks in [-1, 1] (formula in the module docstring)."""
    if a.name == b.name:
        return 1.0
    value = SAME_DOMAIN_WEIGHT * _same_domain(a, b)
    value += SAME_STRUCTURE_WEIGHT * (a.structure is not None and a.structure == b.structure)
    union = a.factors | b.factors
    if union:
        value += SHARED_FACTOR_WEIGHT * len(a.factors & b.factors) / len(union)
    if (a.factors & b.nuisance) or (b.factors & a.nuisance):
        value -= CONFLICT_WEIGHT
    return float(np.clip(round(value, 4), -1.0, 1.0))


def relation_matrix(tasks: Sequence[SyntheticTask] = TASKS) -> np.ndarray:
    """Symmetric task x task matrix of ``relation`` values, in the order of ``tasks``."""
    return np.array([[relation(a, b) for b in tasks] for a in tasks])


def relation_pairs(tasks: Sequence[SyntheticTask] = TASKS) -> dict[str, list[tuple[str, str, float]]]:
    """Split task pairs into designed ``related`` (r >= 0.5), ``conflicting`` (r < 0) and ``unrelated`` (r == 0)."""
    pairs: dict[str, list[tuple[str, str, float]]] = {"related": [], "conflicting": [], "unrelated": []}
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            value = relation(a, b)
            if value >= 0.5:
                pairs["related"].append((a.name, b.name, value))
            elif value < 0:
                pairs["conflicting"].append((a.name, b.name, value))
            elif value == 0:
                pairs["unrelated"].append((a.name, b.name, value))
    return pairs


# --- presets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Image size and per-task number of images of one benchmark size."""

    name: str
    image_size: int
    train_sizes: Mapping[str, int]
    val_size: int
    test_size: int

    def split_sizes(self, task: str) -> dict[str, int]:
        return {"train": self.train_sizes[task], "val": self.val_size, "test": self.test_size}


# Data-rich and data-poor tasks side by side: each group has one data-rich task (segmentation or the gain QC)
# and one or more data-poor tasks whose labels depend on factors of the data-rich one (or conflict with it).
PRESETS: dict[str, Preset] = {
    "small": Preset(
        name="small",
        image_size=128,
        train_sizes={
            "breast_lesion_seg": 240, "breast_lesion_det": 32, "breast_malignancy_cls": 32, "breast_density_cls": 120,
            "fetal_head_seg": 200, "fetal_head_axis": 24, "fetal_hc_mm": 16,
            "cardiac_chamber_seg": 160, "cardiac_lv_dilation_cls": 24,
            "thyroid_nodule_seg": 120, "thyroid_echogenicity_cls": 24, "thyroid_gain_qc_cls": 160,
            "vessel_seg": 96, "vessel_diameter_kp": 40,
            "organ_cls": 120,
        },
        val_size=24,
        test_size=48,
    ),
    "medium": Preset(
        name="medium",
        image_size=256,
        train_sizes={
            "breast_lesion_seg": 2000, "breast_lesion_det": 160, "breast_malignancy_cls": 80, "breast_density_cls": 600,
            "fetal_head_seg": 1500, "fetal_head_axis": 120, "fetal_hc_mm": 40,
            "cardiac_chamber_seg": 1200, "cardiac_lv_dilation_cls": 80,
            "thyroid_nodule_seg": 800, "thyroid_echogenicity_cls": 60, "thyroid_gain_qc_cls": 1000,
            "vessel_seg": 600, "vessel_diameter_kp": 200,
            "organ_cls": 800,
        },
        val_size=100,
        test_size=200,
    ),
}


def pixel_spacing_mm(task: SyntheticTask, image_size: int) -> float | None:
    """Pixel size of the task's images in mm, or None for tasks mixing organs with different fields of view."""
    if task.organ == MULTI_ORGAN:
        return None
    return ORGANS[task.organ].probe.fov_mm / image_size
