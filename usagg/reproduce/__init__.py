"""``usagg reproduce``: a whole study end to end (data check, training, analyses, figures) and its report."""

from usagg.reproduce.pipeline import ReproduceOptions, ReproduceResult, reproduce
from usagg.reproduce.report import ReportContent, ReportTable, write_report

__all__ = ["ReportContent", "ReportTable", "ReproduceOptions", "ReproduceResult", "reproduce", "write_report"]
