"""Rich progress bar for a training run: steps, current task, loss, images per second and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """A progress bar that does nothing when disabled (non-zero ranks, ``--no-progress``)."""

    def __init__(self, run_id: str, total_steps: int, start_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        if enabled:
            # On a narrow terminal the run id and then the loss text are cut with an ellipsis, so the step count,
            # the bar and the times stay visible.
            self._progress = Progress(
                TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=28)),
                MofNCompleteColumn(),
                BarColumn(bar_width=10),
                TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
                expand=True,
            )
            self._task = self._progress.add_task(run_id, total=total_steps, completed=start_step, info="")

    def __enter__(self) -> "TrainProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, step: int, task: str, loss: float, images_per_s: float) -> None:
        if self._progress is None:
            return
        info = f"loss {loss:.4f}  {images_per_s:.1f} img/s  {task}"
        self._progress.update(self._task, completed=step, info=info)
