"""Problems found while reading a data source, collected for ``usagg data check`` or raised at once for training."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from usagg.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataProblem:
    """One problem in a data source: where it is, what is wrong and how to fix it.

    ``fatal`` problems would break or silently corrupt training; the others are warnings.
    """

    task: str  # "" for a problem of the whole dataset root rather than of one task
    message: str
    fix: str = ""
    file: Path | None = None
    row: int | None = None  # 1-based data row (the first line after the CSV header is row 1)
    fatal: bool = True

    @property
    def location(self) -> str:
        if self.file is None:
            return ""
        return f"{self.file}, row {self.row}" if self.row is not None else str(self.file)

    def __str__(self) -> str:
        where = self.location
        if self.row is None and self.message.startswith(f"{self.file}: "):
            where = ""  # the message starts with the file already (decoding errors)
        text = f"task {self.task}: " if self.task else ""
        if where:
            text += f"{where}: "
        text += self.message
        if self.fix:
            text += f"; fix: {self.fix}"
        return text


def problem_from_error(task: str, error: Exception, file: Path | None = None, row: int | None = None) -> DataProblem:
    """Turn a ``DataError`` whose text ends in ``; fix: ...`` into a fatal problem with a separate fix."""
    message, _, fix = str(error).partition("; fix: ")
    return DataProblem(task=task, message=message, fix=fix, file=file, row=row, fatal=True)


class ProblemLog:
    """Receives problems from the readers: raises ``DataError`` on the first fatal one when ``strict``, else collects."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.problems: list[DataProblem] = []

    def add(self, problem: DataProblem) -> None:
        if problem.fatal and self.strict:
            raise DataError(str(problem))
        if not problem.fatal:
            logger.debug("data warning: %s", problem)
        self.problems.append(problem)

    def error(self, task: str, message: str, fix: str = "", file: Path | None = None, row: int | None = None) -> None:
        self.add(DataProblem(task=task, message=message, fix=fix, file=file, row=row, fatal=True))

    def warning(self, task: str, message: str, fix: str = "", file: Path | None = None, row: int | None = None) -> None:
        self.add(DataProblem(task=task, message=message, fix=fix, file=file, row=row, fatal=False))

    @property
    def has_errors(self) -> bool:
        return any(p.fatal for p in self.problems)
