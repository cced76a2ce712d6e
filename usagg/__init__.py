"""usagg: task-aggregation analysis for multi-task ultrasound foundation models."""

__version__ = "0.1.0"
