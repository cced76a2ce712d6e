"""Run-directory files: config checks on resume, run status, results merging."""

from __future__ import annotations

import json

import polars as pl
import pytest
import yaml

from usagg.config import StudyConfig
from usagg.errors import DataError, TrainingError
from usagg.results import PER_IMAGE_SCHEMA
from usagg.results import read_results
from usagg.train.plan import RunSpec
from usagg.train.rundir import (
    check_finished_config,
    collect_results,
    config_changes,
    is_finished,
    load_run,
    update_run_json,
    write_config,
    write_evaluation,
)


def _study(tmp_path, **train) -> StudyConfig:
    tasks = [{"name": "a", "type": "classification", "num_classes": 2, "organ": "breast",
              "source": {"format": "fmc_uia", "root": str(tmp_path / "data")}}]
    return StudyConfig.model_validate({"name": "s", "output": str(tmp_path), "tasks": tasks, "train": train})


def _rows(spec: RunSpec, value: float) -> pl.DataFrame:
    return pl.DataFrame(
        [{"study": "s", "run_id": spec.run_id, "paradigm": spec.paradigm, "group": spec.group, "task": "a",
          "task_type": "classification", "organ": "breast", "clinical_group": "breast", "n_train": 5,
          "data_fraction": spec.fraction, "seed": spec.seed, "split": "test", "metric": "auc", "value": value,
          "higher_is_better": True, "source": "run"}]
    )


def test_write_config_rejects_changed_training_settings(tmp_path):
    spec = RunSpec("s", "task_specific", "a", ("a",), 1.0, 0)
    run_dir = spec.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    write_config(run_dir, _study(tmp_path, epochs=3), spec)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest.json").write_text(
        json.dumps({"step": 2, "weights": "latest-0000002.safetensors", "state": "latest-0000002.pt"}), encoding="utf-8"
    )
    write_config(run_dir, _study(tmp_path, epochs=3), spec)  # same settings: accepted
    with pytest.raises(TrainingError) as info:
        write_config(run_dir, _study(tmp_path, epochs=4), spec)
    assert "the study's training settings changed since this run started (train.epochs: 3.0 -> 4.0)" in str(info.value)
    assert str(run_dir / "config.yaml") in str(info.value)


def test_write_config_replaced_before_first_checkpoint(tmp_path):
    """A run that failed before its first checkpoint takes the new settings instead of raising."""
    spec = RunSpec("s", "task_specific", "a", ("a",), 1.0, 0)
    run_dir = spec.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("train:\n  epochs: 3\n", encoding="utf-8")
    write_config(run_dir, _study(tmp_path, epochs=4), spec)
    written = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert written["train"]["epochs"] == 4


def test_write_config_allows_moved_data(tmp_path):
    spec = RunSpec("s", "task_specific", "a", ("a",), 1.0, 0)
    run_dir = spec.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    write_config(run_dir, _study(tmp_path), spec)
    moved = _study(tmp_path / "elsewhere")
    moved.output = tmp_path
    write_config(run_dir, moved, spec)


def test_run_status_and_load_run(tmp_path):
    study = _study(tmp_path)
    spec = RunSpec("s", "task_specific", "a", ("a",), 0.5, 2)
    run_dir = spec.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    write_config(run_dir, study, spec)
    update_run_json(run_dir, spec=spec.to_dict(), status="finished")
    assert not is_finished(run_dir)  # no results yet
    write_evaluation(run_dir, tmp_path / "s", "test", _rows(spec, 0.7), pl.DataFrame(schema=PER_IMAGE_SCHEMA), {"checkpoint": "best"})
    assert is_finished(run_dir)
    loaded_study, loaded_spec = load_run(run_dir)
    assert loaded_spec == spec
    assert loaded_study.name == "s"
    with pytest.raises(DataError, match="not a run directory"):
        load_run(tmp_path)


def test_collect_results_merges_runs(tmp_path):
    for seed, value in ((0, 0.6), (1, 0.8)):
        spec = RunSpec("s", "unified", "all", ("a",), 1.0, seed)
        run_dir = spec.run_dir(tmp_path)
        run_dir.mkdir(parents=True)
        update_run_json(run_dir, spec=spec.to_dict(), status="finished")
        write_evaluation(run_dir, tmp_path / "s", "test", _rows(spec, value), pl.DataFrame(schema=PER_IMAGE_SCHEMA), {})
    # A re-evaluation replaces the run's row instead of adding one.
    write_evaluation(run_dir, tmp_path / "s", "test", _rows(spec, 0.9), pl.DataFrame(schema=PER_IMAGE_SCHEMA), {})
    (tmp_path / "s" / "results.parquet").unlink()
    path, runs, rows = collect_results(tmp_path / "s")
    assert (runs, rows) == (2, 2)
    table = read_results(path)
    assert sorted(table["value"].to_list()) == [0.6, 0.9]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no run results found"):
        collect_results(tmp_path / "empty")
    with pytest.raises(DataError, match="not a directory"):
        collect_results(tmp_path / "missing")


def test_config_changes_name_key_and_values(tmp_path):
    spec = RunSpec("s", "task_specific", "a", ("a",), 1.0, 0)
    run_dir = spec.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    write_config(run_dir, _study(tmp_path, epochs=3), spec)

    assert config_changes(run_dir, _study(tmp_path, epochs=3), spec) == []
    assert config_changes(run_dir, _study(tmp_path, epochs=3, log_every=1, tensorboard=True), spec) == []
    assert config_changes(run_dir, _study(tmp_path, epochs=3, lr_head=0.5), spec) == ["train.lr_head: 0.001 -> 0.5"]
    assert config_changes(run_dir, _study(tmp_path, epochs=2, fisher_images=8), spec) == [
        "train.epochs: 3.0 -> 2.0", "train.fisher_images: null -> 8",
    ]


def test_config_changes_ignore_settings_added_later_at_default(tmp_path):
    """A run trained before a setting existed is unchanged while the study leaves that setting at its default."""
    import yaml

    spec = RunSpec("s", "task_specific", "a", ("a",), 1.0, 0)
    run_dir = spec.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    write_config(run_dir, _study(tmp_path, epochs=3), spec)
    config = run_dir / "config.yaml"
    old = yaml.safe_load(config.read_text())
    del old["model"]["pretrained_allow_missing"], old["train"]["fisher_images"], old["tasks"][0]["allow_vflip"]
    config.write_text(yaml.safe_dump(old))
    assert config_changes(run_dir, _study(tmp_path, epochs=3), spec) == []
    assert config_changes(run_dir, _study(tmp_path, epochs=3, fisher_images=8), spec) == ["train.fisher_images: (not set) -> 8"]


def test_finished_run_with_other_settings_raises(tmp_path):
    spec = RunSpec("s", "task_specific", "a", ("a",), 1.0, 0)
    run_dir = spec.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    write_config(run_dir, _study(tmp_path, epochs=3), spec)

    check_finished_config(run_dir, _study(tmp_path, epochs=3), spec)
    with pytest.raises(TrainingError) as info:
        check_finished_config(run_dir, _study(tmp_path, epochs=4), spec)

    message = str(info.value)
    assert message.startswith(f"{run_dir}: this run finished with other training settings than the study now gives")
    assert "(train.epochs: 3.0 -> 4.0)" in message
    assert "-o DIR" in message


def test_truncate_train_log_keeps_history_up_to_step(tmp_path):
    from usagg.plots.training import read_train_log
    from usagg.train.rundir import LOG_FILE, truncate_train_log

    lines = [json.dumps({"step": s, "epoch": s / 4, "task": "a", "loss": 1.0 / s}) for s in range(1, 7)]
    lines.insert(2, json.dumps({"event": "eval", "split": "val", "step": 2, "task": "a", "metric": "auc", "value": 0.5}))
    lines.insert(3, json.dumps({"event": "note"}))  # no step: kept
    lines.append(json.dumps({"event": "eval", "split": "val", "step": 6, "task": "a", "metric": "auc", "value": 0.7}))
    log = tmp_path / LOG_FILE
    log.write_text("\n".join(lines) + '\n{"step": 7, "epo')  # the last line torn by a kill

    assert truncate_train_log(tmp_path, 4) == 4  # steps 5 and 6, the eval at 6 and the torn line
    kept = log.read_text().splitlines()
    assert kept == lines[:6]
    train, evals = read_train_log(log)
    assert train["step"].to_list() == [1, 2, 3, 4]
    assert evals["step"].to_list() == [2]

    assert truncate_train_log(tmp_path, 4) == 0
    assert log.read_text().splitlines() == kept
    assert truncate_train_log(tmp_path, 0) == 5
    assert [json.loads(x) for x in log.read_text().splitlines()] == [{"event": "note"}]
    assert truncate_train_log(tmp_path / "missing", 3) == 0


def test_config_changes_compare_task_sets(tmp_path):
    study = StudyConfig.model_validate({
        "name": "s", "output": str(tmp_path),
        "tasks": [{"name": t, "type": "classification", "num_classes": 2, "organ": "breast",
                   "source": {"format": "fmc_uia", "root": str(tmp_path / "data")}} for t in ("a", "b")],
    })
    before = RunSpec("s", "grouped", "breast", ("a", "b"), 1.0, 0)
    run_dir = before.run_dir(tmp_path)
    run_dir.mkdir(parents=True)
    write_config(run_dir, study, before)
    update_run_json(run_dir, spec=before.to_dict(), status="finished")

    after = RunSpec("s", "grouped", "breast", ("b",), 1.0, 0)  # the same group under a new partition
    assert config_changes(run_dir, study, after) == ['tasks of the run: ["a", "b"] -> ["b"]']
    assert config_changes(run_dir, study, before) == []
