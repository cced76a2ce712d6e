"""Launchers: run a plan in this process (``local``) or hand each run to Slurm as its own job (submitit)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usagg.config import StudyConfig
from usagg.errors import ConfigError, TrainingError
from usagg.train.distributed import DistEnv, init_distributed
from usagg.train.loop import TrainOptions, train_run
from usagg.train.plan import RunSpec
from usagg.train.run import execute_plan

logger = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass
class SlurmOptions:
    """Resources of every Slurm job; each planned run is one job (``gpus`` > 1 runs it with DDP inside the job)."""

    partition: str | None = None
    time_min: int = 240
    gpus: int = 1
    cpus_per_task: int = 8
    mem_gb: int | None = None
    account: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # passed to submitit as slurm_additional_parameters


@dataclass
class SubmittedRun:
    spec: RunSpec
    job_id: str
    result: dict[str, Any] | None = None  # filled in when the launcher waits (submitit-local)


def run_job(study: StudyConfig, spec_data: dict[str, Any], options: TrainOptions) -> dict[str, Any]:
    """Entry point of one submitted job: join the job's process group (if any), train the run, summarise it."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "WORLD_SIZE" not in os.environ:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    env = init_distributed(options.device)
    outcome = train_run(study, RunSpec.from_dict(spec_data), TrainOptions(**{**vars(options), "progress": False}), env)
    return {"run_id": outcome.spec.run_id, "status": outcome.status, "steps": outcome.steps, "run_dir": str(outcome.run_dir)}


def submit_runs(
    study: StudyConfig,
    specs: Sequence[RunSpec],
    options: TrainOptions,
    slurm: SlurmOptions,
    cluster: str = "slurm",
    wait: bool = False,
) -> list[SubmittedRun]:
    """Submit one job per run with submitit; ``cluster="local"`` uses submitit's local executor (tests, one machine)."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit; install it with `pip install 'usagg[slurm]'`") from None
    folder = Path(options.output) / study.name / "submitit" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)

    tasks_per_node = max(1, slurm.gpus)
    params: dict[str, Any] = {
        "name": f"usagg-{study.name}",
        "timeout_min": slurm.time_min,
        "nodes": 1,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
    }
    if cluster == "slurm":
        params["gpus_per_node"] = slurm.gpus
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if slurm.mem_gb:
            params["mem_gb"] = slurm.mem_gb
        additional = dict(slurm.extra)
        if slurm.account:
            additional["account"] = slurm.account
        if additional:
            params["slurm_additional_parameters"] = additional
    else:
        params = {"timeout_min": slurm.time_min, "tasks_per_node": 1}
    executor.update_parameters(**params)

    submitted = []
    for spec in specs:
        job = executor.submit(run_job, study, spec.to_dict(), options)
        logger.info("submitted %s as job %s", spec.run_id, job.job_id)
        submitted.append((spec, job))
    runs = [SubmittedRun(spec, str(job.job_id)) for spec, job in submitted]
    try:
        if wait:
            _wait_for_all(runs, [job for _, job in submitted], folder.parent)
    finally:
        # submitit also creates the folder pattern itself, a literal "%j" beside the job folders; drop it if empty.
        with contextlib.suppress(OSError):
            folder.rmdir()
    return runs


def _wait_for_all(runs: list[SubmittedRun], jobs: list[Any], log_folder: Path) -> None:
    """Wait for every job, then raise one error naming each failed run, so no job is left unreported."""
    failures = []
    for run, job in zip(runs, jobs):
        try:
            run.result = job.result()
        except Exception as exc:  # submitit re-raises a job's error with its traceback as text
            failures.append(f"{run.spec.run_id} (job {run.job_id}): {_job_error(exc)}")
            logger.error("%s (job %s) failed; its log is in %s", run.spec.run_id, run.job_id, log_folder / run.job_id)
    if failures:
        raise TrainingError(
            f"{len(failures)} of {len(runs)} submitted run(s) failed: {'; '.join(failures)}. The job logs are in "
            f"{log_folder}/<job id>/; fix the cause and rerun the same command (finished runs are skipped)"
        )


def _job_error(exc: Exception) -> str:
    """Return the job's own error line (``TrainingError: ...``) from the traceback text submitit re-raises."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    if errors:
        name, _, message = errors[-1].partition(": ")
        return f"{name.rsplit('.', 1)[-1]}: {message}"
    return lines[-1] if lines else type(exc).__name__


def launch(
    study: StudyConfig,
    specs: Sequence[RunSpec],
    options: TrainOptions,
    launcher: str = "local",
    slurm: SlurmOptions | None = None,
    env: DistEnv | None = None,
):
    """Run ``specs`` with the chosen launcher; returns run outcomes (local) or submitted jobs (slurm).

    The model settings are checked first, so that a mistake is reported before any run starts or job is queued.
    """
    from usagg.model.backbone import check_model_config

    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher}: unknown launcher; choose one of {', '.join(LAUNCHERS)}")
    # torchrun sets WORLD_SIZE in every process it starts; each would submit the same jobs.
    distributed = (env is not None and env.distributed) or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launcher != "local" and distributed:
        raise ConfigError(f"--launcher {launcher} submits jobs; run it as one process, not under torchrun")
    check_model_config(study.model)
    if launcher == "local":
        return execute_plan(study, specs, options, env or init_distributed(options.device))
    cluster = "local" if launcher == "submitit-local" else "slurm"
    return submit_runs(study, specs, options, slurm or SlurmOptions(), cluster=cluster, wait=cluster == "local")
