"""``usagg reproduce``: a whole study end to end, resumable.

Stages, in order (each one writes files the next one reads, so a rerun continues where a run stopped):

1. ``synthetic`` (``--quick`` without a study only): generate the small synthetic benchmark;
2. ``check``: check every task's data source (skipped on rerun once it passed for the same resolved study);
3. ``train``: train and evaluate every run of every paradigm, fraction and seed (finished runs are skipped,
   interrupted runs resume from their latest checkpoint);
4. ``collect``: merge the runs' results into ``<output>/<study>/results.parquet``;
5. ``analysis``: every analysis the results allow (:func:`usagg.analysis.full.run_full_analysis`);
6. ``figures``: every registered figure the inputs allow;
7. ``report``: ``report.md`` and a self-contained ``report.html`` in the study output folder.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from usagg import __version__
from usagg.errors import AnalysisError, ConfigError, DataError, TrainingError, UsaggError
from usagg.io import write_json_atomic
from usagg.plots.inputs import FigureInputs
from usagg.plots.registry import RenderedFigure, get_figure, load_figures, render_figure
from usagg.plots.style import DEFAULT_FORMATS
from usagg.reproduce.findings import key_findings, key_tables
from usagg.reproduce.report import ReportContent, write_report

if TYPE_CHECKING:  # the config module is imported lazily at run time
    from usagg.config import StudyConfig

logger = logging.getLogger(__name__)

STATE_FILE = "reproduce_state.json"
SYNTHETIC_STUDY = "synthetic.yaml"
SYNTHETIC_DATA_VARIABLE = "USAGG_SYNTH_ROOT"  # the data folder analysis/synthetic.yaml reads
QUICK_DATA = Path("usagg-output") / "synthetic-small"  # the default of analysis/synthetic.yaml
QUICK_FIGURES = Path("figures")
QUICK_RUNS = Path("usagg-output") / "runs"  # beside QUICK_DATA in the current folder, wherever the study file is


@dataclass
class ReproduceOptions:
    """Options of one reproduce run: the study, the output folders, the figure formats and the device."""

    study: Path | None = None  # study YAML; None with quick=True uses the synthetic benchmark
    quick: bool = False  # small synthetic preset, tiny models (minutes on a CPU)
    output: Path | None = None  # root of run directories; default the study's `output`
    figures_dir: Path | None = None  # default figures/ for quick, else <output>/<study>/figures
    formats: Sequence[str] = DEFAULT_FORMATS
    device: str = "auto"
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted study keys, as `usagg train --set`
    train: bool = True  # False: analyse the results already on disk
    progress: bool = True
    # --quick only: keyword arguments of usagg.data.synthetic.make_config overriding the small preset
    # (for example smaller splits in tests).
    synthetic: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRecord:
    name: str
    status: str  # done | skipped | failed
    seconds: float = 0.0
    detail: str = ""


@dataclass
class ReproduceResult:
    study_name: str
    study_dir: Path
    figures_dir: Path
    figures: list[RenderedFigure]
    report_md: Path
    report_html: Path
    stages: list[StageRecord]
    analysis: Any = None  # usagg.analysis.report.AnalysisReport, when the analysis ran


class _Stages:
    """Runs stages in order and records their outcome in the state file after each stage.

    The state file also keeps facts a rerun uses (the digest of the resolved study whose data check passed).
    """

    def __init__(self) -> None:
        self.records: list[StageRecord] = []
        self.state_file: Path | None = None
        self.previous: dict[str, Any] = {}

    def attach(self, state_file: Path) -> None:
        """Start writing to ``state_file``, after reading what an earlier run left in it."""
        self.state_file = state_file
        if state_file.is_file():
            try:
                self.previous = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                logger.warning("%s: cannot read the previous state (%s); starting afresh", state_file, exc)
        self._save()

    def run(self, name: str, step: Callable[[], str | None]) -> None:
        logger.info("reproduce: stage %s", name)
        started = time.perf_counter()
        try:
            detail = step() or ""
        except KeyboardInterrupt:
            # Ctrl-C, or SIGTERM through the usagg command's handler: the state file records where the run stopped.
            self.records.append(StageRecord(name, "interrupted", round(time.perf_counter() - started, 2), "rerun to resume"))
            self._save()
            raise
        except Exception as exc:
            text = str(exc) if isinstance(exc, UsaggError) else f"{type(exc).__name__}: {exc}"
            self.records.append(StageRecord(name, "failed", round(time.perf_counter() - started, 2), text))
            self._save()
            raise
        self.records.append(StageRecord(name, "done", round(time.perf_counter() - started, 2), detail))
        self._save()

    def skip(self, name: str, reason: str) -> None:
        logger.info("reproduce: stage %s skipped (%s)", name, reason)
        self.records.append(StageRecord(name, "skipped", 0.0, reason))
        self._save()

    def remember(self, **fields: Any) -> None:
        self.previous.update(fields)
        self._save()

    def _save(self) -> None:
        if self.state_file is None:
            return
        extra = {k: v for k, v in self.previous.items() if k != "stages"}
        write_json_atomic(self.state_file, {**extra, "stages": [r.__dict__ for r in self.records]})


# --- stages ---------------------------------------------------------------------------------------


def bundled_study(name: str) -> Path:
    """Return a study file of the ``analysis/`` folder that ships with the source checkout."""
    path = Path(__file__).resolve().parents[2] / "analysis" / name
    if not path.is_file():
        raise ConfigError(f"{path}: bundled study file not found; reinstall usagg from its source checkout")
    return path


def generate_quick_benchmark(data_root: Path, **config: Any) -> Path:
    """Generate the small synthetic benchmark into ``data_root`` and return the study YAML that trains on it.

    The generator reuses a folder that already contains the same configuration, so a rerun costs nothing.
    """
    from usagg.data.synthetic import generate_benchmark, make_config

    summary = generate_benchmark(data_root, make_config("small", **config))
    logger.info("synthetic benchmark: %d images in %s", summary.num_images, data_root)
    return bundled_study(SYNTHETIC_STUDY)


def check_data(study_file: Path) -> str:
    """Check every task's data; raise a DataError listing the fatal problems."""
    from usagg.data.check import inspect_path

    report = inspect_path(study_file)
    problems = report.all_problems
    fatal = [p for p in problems if p.fatal]
    if fatal:
        listed = "\n  ".join(str(p) for p in fatal[:10])
        more = f"\n  ... and {len(fatal) - 10} more" if len(fatal) > 10 else ""
        raise DataError(
            f"{study_file}: the data check found {len(fatal)} error(s); fix them and rerun "
            f"(`usagg data check {study_file}` lists every problem):\n  {listed}{more}"
        )
    images = sum(len(t.records) for t in report.tasks)
    return f"{len(report.tasks)} task(s), {images} image(s), {len(problems)} warning(s)"


def planned_runs(study) -> list:
    """Return the runs ``usagg reproduce`` trains for ``study``: every paradigm, plus the study's pair runs."""
    from usagg.train.plan import plan_runs

    specs = plan_runs(study)
    if study.pairs:
        # Measured affinity reads pair runs at the largest data fraction only, so no other fraction is trained.
        specs += plan_runs(study, paradigms=["pair"], pairs=True, fractions=[max(study.fractions)])
    return specs


def unfinished_runs_note(study, output: Path) -> str | None:
    """Return a report line when some planned runs are not finished (None when every one is)."""
    from usagg.train.rundir import RUN_FILE, unfinished_reason

    specs = planned_runs(study)
    missing = []
    for spec in specs:
        run_dir = spec.run_dir(output)
        reason = unfinished_reason(run_dir) if (run_dir / RUN_FILE).exists() else "not started"
        if reason is not None:
            missing.append(f"{spec.run_id} ({reason})")
    if not missing:
        return None
    listed = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
    return (
        f"{len(specs) - len(missing)} of {len(specs)} planned runs are finished, so the results below may lack "
        f"tasks, paradigms or seeds; not finished: {listed}. Rerun without --no-train to train them"
    )


def _budget_text(train) -> str:
    """Return the study's training budget in words, e.g. "6 epochs" or "200 steps"."""
    if train.budget == "steps":
        return f"{train.steps} steps"
    if train.budget == "samples":
        return f"{train.samples_per_task} images per task"
    return f"{train.epochs:g} epochs"


def changed_settings_note(study, output: Path) -> str | None:
    """Return a report line when finished runs were trained with other settings than the study now gives.

    Training stops at such runs, but ``--no-train`` analyses what is on disk, so the report names the settings it reads.
    """
    from usagg.train.rundir import config_changes, is_finished, list_changes

    changed = []
    for spec in planned_runs(study):
        run_dir = spec.run_dir(output)
        if is_finished(run_dir):
            changes = config_changes(run_dir, study, spec)
            if changes:
                changed.append((spec.run_id, changes))
    if not changed:
        return None
    return (
        f"{len(changed)} finished run(s) were trained with other settings than the study now gives (e.g. "
        f"{changed[0][0]}: {list_changes(changed[0][1], limit=3)}); the results below come from those runs as they are"
    )


def train_study(study, output: Path, device: str, progress: bool) -> str:
    """Train and evaluate every planned run; finished runs are skipped and interrupted ones resume."""
    from usagg.train.distributed import init_distributed, shutdown
    from usagg.train.loop import TrainOptions
    from usagg.train.run import execute_plan

    specs = planned_runs(study)
    options = TrainOptions(output=output, device=device, progress=progress)
    env = init_distributed(device)
    try:
        outcomes = execute_plan(study, specs, options, env)
    finally:
        shutdown(env)
    trained = sum(1 for o in outcomes if o.status == "finished")
    skipped = sum(1 for o in outcomes if o.status == "skipped")
    busy = [o.spec.run_id for o in outcomes if o.status == "busy"]
    if busy:
        raise TrainingError(
            f"{len(busy)} run(s) are being trained by another process: {', '.join(busy)}; rerun usagg reproduce "
            "when they are done"
        )
    seconds = sum(o.seconds for o in outcomes)
    return f"{len(specs)} run(s): {trained} trained, {skipped} finished earlier; {seconds:.0f} s of training"


def collect(study_dir: Path) -> str:
    from usagg.train.rundir import collect_results

    table, runs, rows = collect_results(study_dir)
    return f"{rows} row(s) from {runs} run(s) in {table}"


def analyse(study_dir: Path, relations: Path | None, n_bootstrap: int = 2000):
    from usagg.analysis.full import run_full_analysis

    return run_full_analysis(study_dir, study_dir / "analysis", relations=relations, n_bootstrap=n_bootstrap)


def render_all_figures(
    inputs: FigureInputs, figures_dir: Path, formats: Sequence[str], n_bootstrap: int = 2000
) -> tuple[list[RenderedFigure], list[str]]:
    """Render every registered figure the inputs allow; figures with bootstrap intervals use ``n_bootstrap``
    replicates, as the analysis tables do, so both agree.

    Returns the rendered figures and messages for the report: figures not drawn (with the reason) and layout
    problems (clipped or overlapping text) of the drawn ones.
    """
    rendered: list[RenderedFigure] = []
    messages: list[str] = []
    options = {"grouping": _grouping_options(inputs)}
    for name in load_figures():
        figure_options = dict(options.get(name, {}))
        if "n_bootstrap" in get_figure(name).options():
            figure_options["n_bootstrap"] = n_bootstrap
        try:
            figure = render_figure(name, inputs, figures_dir, formats, **figure_options)
        except (AnalysisError, DataError, ConfigError) as exc:
            messages.append(f"figure {name} not drawn: {exc}")
            logger.warning("figure %s not drawn: %s", name, exc)
            continue
        rendered.append(figure)
        messages += [f"figure {name}: {problem}" for problem in figure.layout_problems]
    return rendered, messages


def _grouping_options(inputs: FigureInputs) -> dict[str, Any]:
    """Return the grouping figure's method: the estimator the analysis grouped by, so figure and report agree.

    The analysis picks the estimator that best matches known relations where they exist, while the figure
    alone would take the first available one.
    """
    if inputs.study_dir is None:
        return {}
    file = Path(inputs.study_dir) / "analysis" / "grouping.json"
    if not file.exists():
        return {}
    try:
        method = json.loads(file.read_text(encoding="utf-8")).get("affinity_method")
    except (json.JSONDecodeError, AttributeError):
        logger.warning("%s: unreadable; the grouping figure chooses its own affinity method", file)
        return {}
    return {"method": method} if isinstance(method, str) else {}


# --- orchestration ----------------------------------------------------------------------------------


def _resolve_study(options: ReproduceOptions, stages: _Stages) -> Path:
    if options.study is not None:
        if not Path(options.study).is_file():
            raise ConfigError(f"{options.study}: study file not found")
        return Path(options.study).resolve()
    if not options.quick:
        raise ConfigError("give a study YAML (e.g. `usagg reproduce analysis/fmc_uia_27.yaml`) or --quick for the synthetic benchmark")
    # The study reads its data folder from USAGG_SYNTH_ROOT. A folder the user set is used, and reused when it
    # already contains this configuration. Otherwise the benchmark goes to the study's default folder.
    data_root = Path(os.environ.get(SYNTHETIC_DATA_VARIABLE) or QUICK_DATA).resolve()
    os.environ[SYNTHETIC_DATA_VARIABLE] = str(data_root)
    holder: dict[str, Path] = {}
    stages.run("synthetic", lambda: _generate(data_root, holder, options.synthetic))
    return holder["study"]


def _generate(root: Path, holder: dict[str, Path], config: dict[str, Any]) -> str:
    holder["study"] = generate_quick_benchmark(root, **config).resolve()
    return f"benchmark in {root}, study {holder['study']}"


def _quick_overrides() -> dict[str, Any]:
    """Study overrides for --quick that are not already in the synthetic preset: fewer data-loader workers."""
    return {"data.num_workers": 0}


def output_root(options: ReproduceOptions, study) -> Path:
    """Return the root of the run directories: ``--output``, else the study's ``output``.

    ``--quick`` without a study writes to ``usagg-output/runs`` of the current folder, beside its data, because
    the bundled study's own ``output`` lies beside that file in the repository.
    """
    if options.output is not None:
        return Path(options.output).resolve()
    if options.quick and options.study is None:
        return QUICK_RUNS.resolve()
    return Path(study.output).resolve()


def reproduce(options: ReproduceOptions) -> ReproduceResult:
    """Run the study of ``options`` end to end and return where everything was written."""
    saved = os.environ.get(SYNTHETIC_DATA_VARIABLE)
    try:
        return _reproduce(options)
    finally:
        # --quick sets the synthetic data folder for the stages that reread the study file; restore it.
        if saved is None:
            os.environ.pop(SYNTHETIC_DATA_VARIABLE, None)
        else:
            os.environ[SYNTHETIC_DATA_VARIABLE] = saved


def _reproduce(options: ReproduceOptions) -> ReproduceResult:
    from usagg.config import load_study

    started = time.perf_counter()
    stages = _Stages()
    study_file = _resolve_study(options, stages)
    overrides = {**(_quick_overrides() if options.quick else {}), **options.overrides}
    study = load_study(study_file, overrides)
    output = output_root(options, study)
    study = study.model_copy(update={"output": output})
    study_dir = output / study.name
    study_dir.mkdir(parents=True, exist_ok=True)
    stages.attach(study_dir / STATE_FILE)
    figures_dir = Path(options.figures_dir) if options.figures_dir is not None else (
        QUICK_FIGURES if options.quick else study_dir / "figures"
    )

    if options.train:
        _train_stages(stages, study, study_file, options)
    else:
        stages.skip("check", "--no-train: the data are not read")
        stages.skip("train", "--no-train: using the results on disk")

    n_bootstrap = study.evaluation.bootstrap
    analysis_report = _analysis_stage(stages, study_dir, _relations_file(study_file, study), n_bootstrap)
    figures, figure_messages = _figures_stage(stages, study_dir, figures_dir, options.formats, n_bootstrap)

    unfinished = unfinished_runs_note(study, output)
    other_settings = changed_settings_note(study, output)
    if other_settings:
        logger.warning("%s", other_settings)
    content = ReportContent(
        title=f"usagg study report: {study.name}",
        summary=([f"Incomplete study: {unfinished}"] if unfinished else [])
        + ([f"Other settings: {other_settings}"] if other_settings else [])
        + key_findings(analysis_report),
        figures=figures,
        tables=key_tables(analysis_report),
        warnings=list(analysis_report.warnings),
        messages=figure_messages + list(analysis_report.messages),
        meta={
            "study": f"{study.name} ({study_file})",
            "tasks": str(len(study.tasks)),
            "paradigms": ", ".join(p.value for p in study.paradigms),
            "data fractions": ", ".join(f"{f:g}" for f in study.fractions),
            "seeds": ", ".join(str(s) for s in study.seeds),
            "model": study.model.backbone
            + (f", first {study.model.depth} blocks" if study.model.depth else "")
            + (f", MoE blocks {study.model.moe_blocks} (from 0)" if study.model.moe_blocks else ", MoE in the second half of the blocks"),
            "images": f"{study.data.img_size} px",
            "training budget": _budget_text(study.train),
            "usagg": __version__,
            "python": platform.python_version(),
            "generated": dt.datetime.now().isoformat(timespec="seconds"),
        },
    )
    paths: dict[str, Path] = {}

    def run_report() -> str:
        content.meta["wall time"] = f"{time.perf_counter() - started:.0f} s"
        content.stages = [r.__dict__ for r in stages.records]
        paths["md"], paths["html"] = write_report(content, study_dir)
        return f"{paths['md']} and {paths['html']}"

    stages.run("report", run_report)
    return ReproduceResult(study.name, study_dir, figures_dir, figures, paths["md"], paths["html"], stages.records, analysis_report)


def _train_stages(stages: _Stages, study, study_file: Path, options: ReproduceOptions) -> None:
    """Check the data (unless it passed for the same resolved study), train every run and collect the results."""
    from usagg.config import study_to_yaml

    # The digest covers the resolved study (overrides and data paths included), not only the file.
    digest = hashlib.sha256(study_to_yaml(study).encode("utf-8")).hexdigest()[:16]
    if stages.previous.get("checked_study_digest") == digest:
        stages.skip("check", "passed earlier for the same study")
    else:
        stages.run("check", lambda: check_data(study_file))
        stages.remember(checked_study_digest=digest)
    stages.run("train", lambda: train_study(study, Path(study.output), options.device, options.progress))
    stages.run("collect", lambda: collect(Path(study.output) / study.name))


def _analysis_stage(stages: _Stages, study_dir: Path, relations: Path | None, n_bootstrap: int):
    holder: dict[str, Any] = {}

    def run() -> str:
        report = analyse(study_dir, relations, n_bootstrap)
        holder["report"] = report
        return f"{len(report.tables)} table(s) in {study_dir / 'analysis'}; " + "; ".join(report.messages[:3])

    stages.run("analysis", run)
    return holder["report"]


def _figures_stage(
    stages: _Stages, study_dir: Path, figures_dir: Path, formats: Sequence[str], n_bootstrap: int
) -> tuple[list[RenderedFigure], list[str]]:
    holder: dict[str, Any] = {}

    def run() -> str:
        inputs = FigureInputs.from_paths([study_dir])
        holder["figures"], holder["figure_messages"] = render_all_figures(inputs, figures_dir, formats, n_bootstrap)
        detail = f"{len(holder['figures'])} figure(s) in {figures_dir}"
        return detail + (f"; {len(holder['figure_messages'])} message(s) in the report" if holder["figure_messages"] else "")

    stages.run("figures", run)
    return holder["figures"], holder["figure_messages"]


def _relations_file(study_file: Path, study: StudyConfig) -> Path | None:
    """Return the known task-relation matrix, if any: beside the study, or beside its data folders.

    The synthetic benchmark writes ``relations.csv`` next to its ``train/``, ``val/`` and ``test/`` roots, while
    its study file may live elsewhere (the bundled ``analysis/synthetic.yaml``).
    """
    candidates = [study_file.parent / "relations.csv"]
    for task in study.tasks:
        if task.source is None:  # a study analysed from results on disk may name no data source
            continue
        root = Path(task.source.root)
        candidates += [root / "relations.csv", root.parent / "relations.csv"]
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file():
            logger.info("scoring affinity estimators against %s", candidate)
            return candidate
    return None
