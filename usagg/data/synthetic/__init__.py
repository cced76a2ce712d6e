"""Built-in synthetic ultrasound benchmark with task relations known by construction.

``generate_benchmark(out, make_config(preset, seed))`` writes B-mode-like images of five anatomies and fifteen
tasks of all four task types in the FMC_UIA layout, with the ground-truth relatedness matrix beside them.
"""

from usagg.data.synthetic.tasks import (
    PRESETS,
    TASK_BY_NAME,
    TASKS,
    SyntheticTask,
    relation,
    relation_matrix,
)
from usagg.data.synthetic.writer import (
    GENERATOR_VERSION,
    SynthConfig,
    SynthSummary,
    dataset_digest,
    generate_benchmark,
    make_config,
)

__all__ = [
    "GENERATOR_VERSION",
    "PRESETS",
    "TASKS",
    "TASK_BY_NAME",
    "SynthConfig",
    "SynthSummary",
    "SyntheticTask",
    "dataset_digest",
    "generate_benchmark",
    "make_config",
    "relation",
    "relation_matrix",
]
