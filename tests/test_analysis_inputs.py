"""Inputs of the analysis read from a study folder: notes about runs that cannot be compared as they are."""

from __future__ import annotations

import json

from usagg.analysis.inputs import evaluation_setting_notes


def _meta(folder, **settings):
    folder.mkdir(parents=True)
    test = {"checkpoint": "best", "empty_mask_policy": "fmc_uia", "one_class_policy": "nan", **settings}
    (folder / "results_meta.json").write_text(json.dumps({"test": test}))


def test_runs_evaluated_with_different_settings_are_named(tmp_path):
    for run in ("task_specific/a/frac-1/seed-0", "task_specific/b/frac-1/seed-0", "unified/all/frac-1/seed-0"):
        _meta(tmp_path / run)
    _meta(tmp_path / "grouped/g/frac-1/seed-0", checkpoint="latest", empty_mask_policy="nan")
    notes = evaluation_setting_notes(tmp_path)
    assert len(notes) == 2
    assert notes[0] == (
        f"runs under {tmp_path} were evaluated on test with different checkpoint: best (3 run(s)); latest (1 run(s), "
        "e.g. grouped/g/frac-1/seed-0); their metrics are not comparable, so evaluate them with one setting "
        "(usagg evaluate RUN_DIR)"
    )
    assert "different empty_mask_policy: fmc_uia (3 run(s)); nan (1 run(s)" in notes[1]


def test_runs_with_one_setting_give_no_note(tmp_path):
    for run in ("task_specific/a/frac-1/seed-0", "unified/all/frac-1/seed-0"):
        _meta(tmp_path / run)
    assert evaluation_setting_notes(tmp_path) == []


def test_study_table_file_gets_setting_notes(tmp_path):
    from test_analysis_relative import row, table

    from usagg.analysis.inputs import load_inputs
    from usagg.results import write_results

    _meta(tmp_path / "task_specific/a/frac-1/seed-0")
    _meta(tmp_path / "unified/all/frac-1/seed-0", checkpoint="latest")
    path = write_results(table([row("task_specific", "a", "dice", 0.8, True), row("unified", "a", "dice", 0.7, True)]),
                         tmp_path / "results.parquet")
    notes = load_inputs(path).notes
    assert [n for n in notes if "different checkpoint" in n]
