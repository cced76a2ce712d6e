"""CLI commands of the train stage: ``train``, ``evaluate``, ``predict`` and ``results collect``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from usagg.cli.tables import output_console
from usagg.errors import ConfigError

console = Console()
results_app = typer.Typer(help="Merge the results tables of a study's runs.", no_args_is_help=True)


def _parse_overrides(items: list[str] | None) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, for example --set train.epochs=2")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def train(
    study_file: Annotated[Path, typer.Argument(help="Study YAML file.", metavar="STUDY.yaml")],
    paradigm: Annotated[Optional[list[str]], typer.Option("--paradigm", "-p", metavar="PARADIGM", help="Train only this paradigm (task_specific, grouped, unified, pair); repeatable.")] = None,
    group: Annotated[Optional[list[str]], typer.Option("--group", "-g", metavar="GROUP", help="Train only runs with this group name; repeatable.")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", metavar="TASK", help="Train only runs that include this task; repeatable.")] = None,
    fraction: Annotated[Optional[list[float]], typer.Option("--fraction", "-f", metavar="FRACTION", help="Train only this data fraction; repeatable.")] = None,
    seed: Annotated[Optional[list[int]], typer.Option("--seed", "-s", metavar="SEED", help="Train only this seed; repeatable.")] = None,
    groups_file: Annotated[Optional[Path], typer.Option("--groups", help="YAML file with a 'groups:' block replacing the grouped paradigm's partition.")] = None,
    pairs: Annotated[bool, typer.Option("--pairs", help="Add pair runs (the study's pairs, or every pair of tasks) for measured affinity.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output directory, overriding the study's 'output'.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (runs, images, steps) and exit.")] = False,
    launcher: Annotated[str, typer.Option(help="local: run here one after another; slurm: one Slurm job per run (submitit); submitit-local: submitit's local executor.")] = "local",
    device: Annotated[str, typer.Option(help="auto (GPU when available), cpu or cuda.")] = "auto",
    skip_nonfinite: Annotated[bool, typer.Option("--skip-nonfinite", help="Skip batches whose loss or gradient is NaN/infinite instead of stopping.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a study key, e.g. --set train.epochs=2; repeatable. A relative path is taken from the current folder.")] = None,
    slurm_partition: Annotated[Optional[str], typer.Option(help="Slurm partition.")] = None,
    slurm_time: Annotated[int, typer.Option(help="Slurm time limit per run, minutes.")] = 240,
    slurm_gpus: Annotated[int, typer.Option(help="GPUs per Slurm job (more than 1 trains the run with DDP).")] = 1,
    slurm_cpus: Annotated[int, typer.Option(help="CPUs per task of a Slurm job.")] = 8,
    slurm_mem_gb: Annotated[Optional[int], typer.Option(help="Memory per Slurm job, GB.")] = None,
    slurm_account: Annotated[Optional[str], typer.Option(help="Slurm account.")] = None,
) -> None:
    """Train every run a study implies (task-specific, grouped, unified; x fractions x seeds), then evaluate it.

    Finished runs are skipped and interrupted ones resume, so rerun the same command until the study is complete.
    Under `torchrun --nproc-per-node N -m usagg train ...` each run is trained data-parallel.
    """
    from usagg.config import load_study
    from usagg.train.distributed import init_distributed, shutdown
    from usagg.train.launch import SlurmOptions, launch
    from usagg.train.loop import TrainOptions
    from usagg.train.plan import load_groups_file, plan_runs
    from usagg.train.run import describe_plan

    study = load_study(study_file, _parse_overrides(overrides))
    from usagg.model.backbone import check_model_config

    try:
        check_model_config(study.model)  # before any run starts, so a mistake does not first show up in a Slurm job
    except ConfigError as exc:
        raise ConfigError(f"{study_file}: {exc}") from None
    if output is not None:
        study = study.model_copy(update={"output": output.resolve()})
    partition = load_groups_file(groups_file, study) if groups_file is not None else None
    if partition is not None:
        study = study.model_copy(update={"groups": partition})
    specs = plan_runs(
        study,
        paradigms=paradigm,
        groups=partition,
        pairs=pairs,
        group_filter=group,
        task_filter=task,
        fractions=fraction,
        seeds=seed,
    )
    options = TrainOptions(
        output=Path(study.output).resolve(),
        device=device,
        skip_nonfinite=True if skip_nonfinite else None,
        progress=progress,
    )
    if not specs:
        console.print("no runs match the filters")
        return
    if dry_run:
        _print_plan(describe_plan(study, specs, options), study)
        return
    env = init_distributed(device) if launcher == "local" else None
    slurm = SlurmOptions(
        partition=slurm_partition,
        time_min=slurm_time,
        gpus=slurm_gpus,
        cpus_per_task=slurm_cpus,
        mem_gb=slurm_mem_gb,
        account=slurm_account,
    )
    try:
        outcome = launch(study, specs, options, launcher=launcher, slurm=slurm, env=env)
    finally:
        if env is not None:
            shutdown(env)
    if env is not None and not env.is_main:
        return
    if launcher == "local":
        table = Table(title=escape(f"usagg train: {study.name}"))
        for column in ("run", "status", "steps", "train s", "img/s"):
            # Long run ids wrap rather than lose their fraction and seed on a narrow terminal.
            table.add_column(column, justify="left" if column in ("run", "status") else "right", overflow="fold")
        for result in outcome:
            if result.status == "skipped":
                # Nothing was trained in this call. The run's own numbers are in its run.json.
                cells = ["skipped: finished earlier", "–", "–", "–"]
            elif result.status == "busy":
                cells = [f"skipped: being trained by {result.extra['holder']}", "–", "–", "–"]
            else:
                cells = [result.status, str(result.steps), f"{result.seconds:.1f}", f"{result.images_per_s:.1f}"]
            table.add_row(escape(result.spec.run_id), *(escape(cell) for cell in cells))
        output_console(console).print(table)
        console.print(escape(f"results: {os.path.normpath(Path(study.output) / study.name / 'results.parquet')}"))
    else:
        study_folder = os.path.normpath(Path(study.output) / study.name)
        table = Table(title=escape(f"usagg train ({launcher}): {study.name}"))
        for column in ("run", "job", "status"):
            table.add_column(column)
        for submitted in outcome:
            if submitted.result is None:
                status = "submitted"
            elif submitted.result.get("status") == "skipped":
                status = "skipped: finished earlier"
            else:
                status = str(submitted.result.get("status"))
            table.add_row(escape(submitted.spec.run_id), escape(submitted.job_id), escape(status))
        output_console(console).print(table)
        console.print(escape(f"job logs: {study_folder}/submitit/<job id>/"), highlight=False)
        if launcher == "submitit-local":
            console.print(escape(f"results: {study_folder}/results.parquet"), highlight=False)
        else:
            console.print(
                escape(f"when the jobs have finished: usagg results collect {study_folder}"), highlight=False
            )


def _print_plan(planned, study) -> None:
    count = f"{len(planned)} run" if len(planned) == 1 else f"{len(planned)} runs"
    table = Table(title=escape(f"plan for study {study.name} ({count})"))
    for column in ("run", "tasks", "train images", "steps", "images seen", "state"):
        table.add_column(column, justify="right" if column in ("train images", "steps", "images seen") else "left")
    for run in planned:
        table.add_row(
            escape(run.spec.run_id),
            escape(", ".join(run.spec.tasks)) if len(run.spec.tasks) <= 3 else f"{len(run.spec.tasks)} tasks",
            str(sum(run.n_train.values())),
            str(run.steps),
            str(run.images),
            escape(run.state),
        )
    output_console(console).print(table)
    console.print(
        escape(
            f"total: {sum(r.steps for r in planned)} steps, {sum(r.images for r in planned)} images "
            f"(budget: {study.train.budget}, batch size {study.train.batch_size})"
        )
    )


def evaluate(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory (<output>/<study>/<paradigm>/<group>/frac-<f>/seed-<s>).", metavar="RUN_DIR")
    ],
    split: Annotated[Optional[str], typer.Option(help="val or test; default the study's evaluation.split.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="best or latest; default the study's evaluation.checkpoint.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    fisher_images: Annotated[
        Optional[int],
        typer.Option(
            "--fisher-images",
            min=1,
            help="Also compute the Fisher task affinity (Task2Vec) on the checkpoint from N training images per task "
            "and add it to the run's affinity.json (runs trained without train.fisher_images).",
        ),
    ] = None,
    allow_unfinished: Annotated[
        bool,
        typer.Option(
            "--allow-unfinished",
            help="Score a run that stopped before its last step; its rows stay in the run folder and are not "
            "added to the study's results table.",
        ),
    ] = False,
) -> None:
    """Evaluate a trained run on a split and write its results (run table and the study's table)."""
    from usagg.train.finalize import evaluate_run

    rows = evaluate_run(
        run_dir, split=split, checkpoint=checkpoint, device=device, fisher_images=fisher_images,
        allow_unfinished=allow_unfinished,
    )
    table = Table(title=escape(f"usagg evaluate: {run_dir}"))
    for column in ("task", "split", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for row in rows.iter_rows(named=True):
        table.add_row(escape(str(row["task"])), escape(str(row["split"])), escape(str(row["metric"])), f"{row['value']:.4f}")
    console.print(table)


def predict(
    run_dir: Annotated[Path, typer.Argument(help="Trained run directory.", metavar="RUN_DIR")],
    data_root: Annotated[
        Path,
        typer.Argument(
            help="Data folder in the FMC_UIA layout: csv_files/ with one CSV per task (label columns included) and "
            "the images and masks the CSVs name.",
            metavar="DATA_ROOT",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder for the prediction files.")],
    format: Annotated[str, typer.Option("--format", help="Submission format; only fmc_uia is supported.")] = "fmc_uia",
    checkpoint: Annotated[Optional[str], typer.Option(help="best or latest; default the study's evaluation.checkpoint.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Write predictions for every image of DATA_ROOT in the FMC_UIA challenge's submission format.

    Each CSV task of DATA_ROOT is matched to the run's task with the same task id: a task card's source.task_id
    for the fmc_uia format, else its name. Tasks the run did not train are skipped with a warning."""
    from usagg.evaluate.predict import write_fmc_uia_predictions

    if format != "fmc_uia":
        raise ConfigError(f"--format {format}: unsupported; the only format is fmc_uia")
    summary = write_fmc_uia_predictions(run_dir, data_root, out, checkpoint=checkpoint, device=device)
    for kind, count in summary.items():
        console.print(escape(f"{kind}: {count}"))
    console.print(f"predictions written to {escape(str(out))}")


@results_app.command("collect")
def results_collect(
    output_dir: Annotated[Path, typer.Argument(help="Study output directory (<output>/<study>) or the output root.", metavar="OUTPUT_DIR")],
) -> None:
    """Merge the results of every run below OUTPUT_DIR into OUTPUT_DIR/results.parquet (+ .csv)."""
    from usagg.train.rundir import collect_results

    path, n_runs, n_rows = collect_results(output_dir)
    console.print(f"{n_rows} rows from {n_runs} runs -> {escape(str(path))}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the root app."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)
    app.add_typer(results_app, name="results")
