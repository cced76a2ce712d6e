"""``usagg reproduce``: the pipeline on results already on disk, its state file, and the end-to-end quick run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from test_plots_fixtures import STUDY, TASKS_27, write_study_dir, write_study_yaml
from typer.testing import CliRunner

from usagg.cli import app
from usagg.errors import ConfigError
from usagg.reproduce.pipeline import STATE_FILE, SYNTHETIC_STUDY, ReproduceOptions, reproduce

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """Run the pipeline with --no-train on the fixture study folder (analysis, figures, report)."""
    root = tmp_path_factory.mktemp("reproduce")
    output = root / "runs"
    write_study_dir(output)
    study_file = write_study_yaml(root / "study.yaml", output)
    result = reproduce(ReproduceOptions(study=study_file, train=False, figures_dir=root / "figures", formats=("png",)))
    return root, result


def test_no_train_pipeline_writes_figures_and_report(reproduced):
    root, result = reproduced
    assert result.study_dir == root / "runs" / STUDY
    drawn = sorted(f.name for f in result.figures)
    assert drawn == sorted(["data-scale", "transfer-matrix", "group-paradigm", "task-type", "affinity", "expert-usage", "grouping", "training"])
    for figure in result.figures:
        assert figure.path("png").is_file()
        assert figure.layout_problems == []
    assert result.report_md.is_file()
    assert result.report_html.is_file()
    assert (result.study_dir / "analysis" / "analysis_report.json").is_file()


def test_no_train_stages_recorded(reproduced):
    _, result = reproduced
    status = {r.name: r.status for r in result.stages}
    assert status == {"check": "skipped", "train": "skipped", "analysis": "done", "figures": "done", "report": "done"}
    state = json.loads((result.study_dir / STATE_FILE).read_text(encoding="utf-8"))
    assert [s["name"] for s in state["stages"]] == ["check", "train", "analysis", "figures", "report"]


def test_grouping_figure_uses_analysis_method(reproduced):
    root, result = reproduced
    grouping = json.loads((result.study_dir / "analysis" / "grouping.json").read_text(encoding="utf-8"))
    assert grouping["affinity_method"] in grouping["method"]
    drawn = (root / "figures" / "grouping.csv").read_text(encoding="utf-8")
    header, first = drawn.splitlines()[:2]
    assert first.split(",")[header.split(",").index("method")] == grouping["affinity_method"]


def test_report_names_key_findings(reproduced):
    _, result = reproduced
    text = result.report_md.read_text(encoding="utf-8")
    assert "## Key findings" in text
    assert "unified training: Δm =" in text
    assert "![data-scale](../../figures/data-scale.png)" in text
    # The analysis's statistical warnings are in the report, not only on the terminal.
    warnings = json.loads((result.study_dir / "analysis" / "analysis_report.json").read_text(encoding="utf-8"))["warnings"]
    assert warnings
    section = text[text.index("## Warnings about the results"):]
    assert all(f"- {line}" in section for line in warnings)


def test_missing_study_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="study file not found"):
        reproduce(ReproduceOptions(study=tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="--quick"):
        reproduce(ReproduceOptions())


def test_cli_reproduce_no_train(tmp_path):
    output = tmp_path / "runs"
    tasks = TASKS_27[:12]  # a smaller study keeps this second pipeline run short
    write_study_dir(output, tasks, fractions=(0.5, 1.0))
    study_file = write_study_yaml(tmp_path / "study.yaml", output, tasks)
    result = CliRunner().invoke(
        app, ["reproduce", str(study_file), "--no-train", "--figures", str(tmp_path / "figs"), "--format", "png"]
    )
    assert result.exit_code == 0, result.output
    assert (output / STUDY / "report.html").is_file()
    assert len(list((tmp_path / "figs").glob("*.png"))) == 8


def _synthetic_available() -> bool:
    if importlib.util.find_spec("usagg.data.synthetic") is None or importlib.util.find_spec("usagg.train.run") is None:
        return False
    import usagg.data.synthetic as synthetic

    return hasattr(synthetic, "generate_benchmark") and (REPO / "analysis" / SYNTHETIC_STUDY).is_file()


needs_synthetic = pytest.mark.skipif(
    not _synthetic_available(), reason="needs the synthetic generator, analysis/synthetic.yaml and training"
)
TINY_TASKS = ["breast_lesion_seg", "breast_malignancy_cls", "fetal_head_seg", "fetal_head_axis"]


def _tiny_synthetic(tmp_path, monkeypatch) -> None:
    """Generate a tiny synthetic benchmark (8 to 16 training images per task, 64 px) where the study reads it."""
    from usagg.data.synthetic import PRESETS, generate_benchmark, make_config

    sizes = {name: 8 for name in PRESETS["small"].train_sizes}
    sizes.update({"breast_lesion_seg": 16, "fetal_head_seg": 12})  # unequal sizes give the data-scale fit a slope
    data = tmp_path / "synthetic"
    generate_benchmark(data, make_config("small", image_size=64, train_sizes=sizes, val_size=4, test_size=8), workers=1)
    monkeypatch.setenv("USAGG_SYNTH_ROOT", str(data))


@needs_synthetic
def test_quick_study_resolves_and_checks(tmp_path, monkeypatch):
    """The --quick path: the bundled synthetic study loads on the generated data and passes the data check."""
    from usagg.reproduce.pipeline import bundled_study, check_data

    _tiny_synthetic(tmp_path, monkeypatch)
    detail = check_data(bundled_study(SYNTHETIC_STUDY))
    assert detail.startswith("15 task(s)")


@pytest.mark.slow
@needs_synthetic
def test_reproduce_trains_end_to_end(tmp_path, monkeypatch):
    """Every stage with real training: four synthetic tasks, one fraction, a few steps per run."""
    _tiny_synthetic(tmp_path, monkeypatch)
    study = yaml.safe_load((REPO / "analysis" / SYNTHETIC_STUDY).read_text(encoding="utf-8"))
    study["tasks"] = [t for t in study["tasks"] if t["name"] in TINY_TASKS]
    study.update(
        output=str(tmp_path / "runs"),
        fractions=[1.0],
        seeds=[0],
        pairs=[["fetal_head_seg", "fetal_head_axis"]],
    )
    study["data"].update(img_size=32, cache_images=True)
    study["model"].update(depth=2, moe_blocks=[1], num_experts=2, decoder_dim=16)
    study["train"].update(budget="steps", steps=3, batch_size=4)
    study["evaluation"]["bootstrap"] = 20
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")

    result = reproduce(
        ReproduceOptions(study=study_file, figures_dir=tmp_path / "figures", formats=("png",), device="cpu", progress=False)
    )
    status = {r.name: r.status for r in result.stages}
    assert status == {"check": "done", "train": "done", "collect": "done", "analysis": "done", "figures": "done", "report": "done"}
    names = {f.name for f in result.figures}
    assert {"transfer-matrix", "group-paradigm", "task-type", "expert-usage", "training"} <= names
    assert result.report_html.is_file()
    # relations.csv lies beside the generated data, not beside the study file. The estimators are scored on it.
    scores = (result.study_dir / "analysis" / "affinity_scores.csv").read_text(encoding="utf-8")
    assert scores.startswith("method,")
    assert "measured" in scores
    runs = sorted(p.parent.relative_to(result.study_dir).as_posix() for p in result.study_dir.rglob("run.json"))
    assert len(runs) == 4 + 2 + 1 + 1  # task-specific, grouped, unified and the pair run

    rerun = reproduce(
        ReproduceOptions(study=study_file, figures_dir=tmp_path / "figures", formats=("png",), device="cpu", progress=False)
    )
    assert next(r for r in rerun.stages if r.name == "check").status == "skipped"
    assert "8 finished earlier" in next(r for r in rerun.stages if r.name == "train").detail

    # --no-train with other settings analyses the runs on disk, and the report states that they were trained otherwise.
    other = reproduce(
        ReproduceOptions(study=study_file, train=False, overrides={"train.steps": 4}, figures_dir=tmp_path / "figures",
                         formats=("png",), device="cpu", progress=False)
    )
    text = other.report_md.read_text(encoding="utf-8")
    assert "- Other settings: 8 finished run(s) were trained with other settings than the study now gives" in text
    assert "train.steps: 3 -> 4" in text
    assert "- **training budget**: 4 steps" in text
    warnings = json.loads((other.study_dir / "analysis" / "analysis_report.json").read_text(encoding="utf-8"))["warnings"]
    if warnings:
        assert "## Warnings about the results" in text
        assert all(line in text for line in warnings)


def test_fmc_study_needs_data_root(monkeypatch):
    monkeypatch.delenv("FMC_UIA_ROOT", raising=False)
    with pytest.raises(ConfigError, match="FMC_UIA_ROOT is not set"):
        reproduce(ReproduceOptions(study=REPO / "analysis" / "fmc_uia_27.yaml"))


def test_quick_writes_runs_to_the_current_folder(tmp_path, monkeypatch):
    """--quick from any folder keeps its runs beside its data there, not inside the repository."""
    from types import SimpleNamespace

    from usagg.reproduce.pipeline import output_root

    monkeypatch.chdir(tmp_path)
    study = SimpleNamespace(output=REPO / "usagg-output" / "runs")
    assert output_root(ReproduceOptions(quick=True), study) == tmp_path / "usagg-output" / "runs"
    assert output_root(ReproduceOptions(quick=True, output=Path("elsewhere")), study) == tmp_path / "elsewhere"
    assert output_root(ReproduceOptions(study=tmp_path / "s.yaml"), study) == REPO / "usagg-output" / "runs"


def test_report_notes_missing_runs(reproduced):
    """The fixture folder has results for every task but run folders for only a few runs, and the report states it."""
    _, result = reproduced
    text = result.report_md.read_text(encoding="utf-8")
    findings = text[text.index("## Key findings"):]
    first = findings.splitlines()[2]
    assert first.startswith("- Incomplete study: 3 of 222 planned runs are finished, so the results below may lack")
    assert first.endswith("Rerun without --no-train to train them")


def test_state_file_records_interrupted_and_failed_stages(tmp_path):
    from usagg.reproduce.pipeline import _Stages

    def interrupted():
        raise KeyboardInterrupt

    def broken():
        raise ValueError("bad value")

    for step, status, detail in ((interrupted, "interrupted", "rerun to resume"), (broken, "failed", "ValueError: bad value")):
        stages = _Stages()
        stages.attach(tmp_path / f"{status}.json")
        stages.run("check", lambda: "ok")
        with pytest.raises((KeyboardInterrupt, ValueError)):
            stages.run("train", step)
        recorded = json.loads((tmp_path / f"{status}.json").read_text(encoding="utf-8"))["stages"]
        assert [(r["name"], r["status"]) for r in recorded] == [("check", "done"), ("train", status)]
        assert recorded[1]["detail"] == detail
