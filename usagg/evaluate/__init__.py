"""Evaluation: clinical metrics, evaluation of a run into results rows, and FMC_UIA submission files."""
