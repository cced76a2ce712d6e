"""Analysis stage: relative change and Δm, uncertainty, task affinity, grouping and data-scale statistics.

The public functions are re-exported here; each lives in the module of its concept. ``run_full_analysis`` runs
every analysis the inputs allow (the entry point of ``usagg reproduce``).
"""

from usagg.analysis.advise import Advice, advise
from usagg.analysis.affinity import (
    agreement,
    agreement_table,
    expert_affinity_matrix,
    expert_affinity_per_layer,
    gradient_affinity_matrix,
    load_affinity,
    lookahead_affinity_matrix,
    measured_affinity,
    read_matrix_csv,
    read_relations,
    score_against_relations,
    write_matrix_csv,
)
from usagg.analysis.affinity_analysis import AffinityAnalysis, analyse_affinity
from usagg.analysis.data_scale import DataScaleFit, fit_data_scale, group_view
from usagg.analysis.full import run_full_analysis
from usagg.analysis.grouping import GroupingResult, partition_score, recommend_groups, task_scores
from usagg.analysis.inference import GroupTest, kruskal_by, per_task_means, seed_summary, t_interval, task_type_sensitivity
from usagg.analysis.inputs import AnalysisInputs, load_inputs
from usagg.analysis.relative import delta_m, parse_metric_overrides, relative_change
from usagg.analysis.report import AnalysisReport
from usagg.analysis.transfer import TransferAnalysis, analyse_transfer, delta_m_table

__all__ = [
    "Advice",
    "AffinityAnalysis",
    "AnalysisInputs",
    "AnalysisReport",
    "DataScaleFit",
    "GroupTest",
    "GroupingResult",
    "TransferAnalysis",
    "advise",
    "agreement",
    "agreement_table",
    "analyse_affinity",
    "analyse_transfer",
    "delta_m",
    "delta_m_table",
    "expert_affinity_matrix",
    "expert_affinity_per_layer",
    "fit_data_scale",
    "gradient_affinity_matrix",
    "group_view",
    "kruskal_by",
    "load_affinity",
    "load_inputs",
    "lookahead_affinity_matrix",
    "measured_affinity",
    "parse_metric_overrides",
    "partition_score",
    "per_task_means",
    "read_matrix_csv",
    "read_relations",
    "recommend_groups",
    "relative_change",
    "run_full_analysis",
    "score_against_relations",
    "seed_summary",
    "t_interval",
    "task_scores",
    "task_type_sensitivity",
    "write_matrix_csv",
]
