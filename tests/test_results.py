"""Results table: schema validation, atomic parquet + CSV writing, merging."""

from __future__ import annotations

import re

import polars as pl
import pytest

from usagg.errors import DataError
from usagg.results import RESULTS_SCHEMA, append_results, read_results, validate_results, write_results


def rows(run_id: str, value: float, seed: int | None = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "study": ["s"],
            "run_id": [run_id],
            "paradigm": ["unified"],
            "group": ["all"],
            "task": ["lesion"],
            "task_type": ["segmentation"],
            "organ": ["breast"],
            "clinical_group": ["breast"],
            "n_train": [40],
            "data_fraction": [1.0],
            "seed": [seed],
            "split": ["test"],
            "metric": ["dice"],
            "value": [value],
            "higher_is_better": [True],
            "source": ["run"],
        }
    )


def test_write_and_read_round_trip(tmp_path):
    path = write_results(rows("r1", 0.5), tmp_path / "results.parquet")
    assert (tmp_path / "results.csv").exists()
    back = read_results(path)
    assert back.schema == pl.Schema(RESULTS_SCHEMA)
    assert back["value"].to_list() == [0.5]
    assert read_results(tmp_path / "results.csv")["value"].to_list() == [0.5]


def test_null_seed_allowed_for_reported_numbers(tmp_path):
    path = write_results(rows("paper", 0.713, seed=None), tmp_path / "r.parquet")
    assert read_results(path)["seed"].to_list() == [None]


def test_append_replaces_same_key(tmp_path):
    path = tmp_path / "results.parquet"
    append_results(rows("r1", 0.5), path)
    append_results(rows("r2", 0.6), path)
    append_results(rows("r1", 0.7), path)
    table = read_results(path).sort("run_id")
    assert table["run_id"].to_list() == ["r1", "r2"]
    assert table["value"].to_list() == [0.7, 0.6]


def test_missing_column_named(tmp_path):
    path = tmp_path / "bad.csv"
    rows("r1", 0.5).drop("metric").write_csv(path)
    with pytest.raises(DataError, match="missing required column\\(s\\) metric"):
        read_results(path)


def test_empty_required_cell_names_row(tmp_path):
    path = tmp_path / "bad.csv"
    table = pl.concat([rows("r1", 0.5), rows("r2", 0.6).with_columns(pl.lit(None, pl.String).alias("task"))])
    table.write_csv(path)
    with pytest.raises(DataError, match="row 2: column 'task' is empty"):
        read_results(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "results.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match="use .parquet or .csv"):
        read_results(path)


def test_folder_without_table_suggests_collect(tmp_path):
    with pytest.raises(DataError, match="usagg results collect"):
        read_results(tmp_path)


def test_written_files_follow_umask(tmp_path):
    import os
    import stat

    import torch

    from usagg.train.checkpoint import save_checkpoint

    path = write_results(rows("r1", 0.5), tmp_path / "results.parquet")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    # safetensors recreates its output file as 0600; the checkpoint still gets the umask's permissions.
    save_checkpoint(tmp_path / "run", "latest", torch.nn.Linear(2, 2), 1, {})
    for file in (tmp_path / "run" / "checkpoints").iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name


def _csv_with(tmp_path, column: str, bad: str):
    """Return a two-row results CSV whose second row (line 3) has ``bad`` in ``column``."""
    path = tmp_path / "results.csv"
    pl.concat([rows("r1", 0.5), rows("r2", 0.6)]).write_csv(path)
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index(column)] = bad
    lines[2] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_non_numeric_value_names_cell(tmp_path):
    path = _csv_with(tmp_path, "value", '"0,83"')
    with pytest.raises(DataError) as caught:
        read_results(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: row 2: column 'value' has '0,83', which is not a number; ")
    assert "dot as the decimal mark" in message
    assert "infer_schema_length" not in message
    assert "ignore_errors" not in message
    # An empty value stays allowed.
    assert read_results(_csv_with(tmp_path, "value", "NA"))["value"].to_list() == [0.5, None]


def test_bad_boolean_and_integer_cells(tmp_path):
    with pytest.raises(DataError, match="row 2: column 'higher_is_better' has 'yes', which is not true or false"):
        read_results(_csv_with(tmp_path, "higher_is_better", "yes"))
    with pytest.raises(DataError, match="row 2: column 'n_train' has '40.5', which is not a whole number"):
        read_results(_csv_with(tmp_path, "n_train", "40.5"))


def test_misspelled_paradigm_raises(tmp_path):
    path = _csv_with(tmp_path, "paradigm", "unifed")
    expected = (
        "row 2: paradigm 'unifed' is not a known paradigm (did you mean 'unified'?); "
        "use one of task_specific, grouped, unified, pair"
    )
    with pytest.raises(DataError) as caught:
        read_results(path)
    assert str(caught.value) == f"{path}: {expected}"
    frame = pl.concat([rows("r1", 0.5), rows("r2", 0.6).with_columns(pl.lit("unifed").alias("paradigm"))])
    with pytest.raises(DataError, match=re.escape(expected)):
        validate_results(frame, origin="table")


def test_string_value_column_names_cell():
    frame = pl.concat([rows("r1", 0.5), rows("r2", 0.6)]).with_columns(pl.Series("value", ["0.5", "abc"]))
    with pytest.raises(DataError, match="t.parquet: row 2: column 'value' has 'abc', which is not a number"):
        validate_results(frame, origin="t.parquet")


def test_misspelled_task_type_raises(tmp_path):
    path = _csv_with(tmp_path, "task_type", "segmentaton")

    with pytest.raises(DataError) as caught:
        read_results(path)

    assert str(caught.value) == (
        f"{path}: row 2: task_type 'segmentaton' is not a known task_type (did you mean 'segmentation'?); "
        "use one of segmentation, classification, detection, regression"
    )


def test_train_images_row_may_count_all_types():
    count = rows("r2", 240.0).with_columns(
        pl.lit("all").alias("task"), pl.lit("all").alias("task_type"), pl.lit("train_images").alias("metric")
    )
    table = validate_results(pl.concat([rows("r1", 0.5), count]))

    assert table["task_type"].to_list() == ["segmentation", "all"]
    with pytest.raises(DataError, match="row 2: task_type 'all' is not a known task_type"):
        validate_results(pl.concat([rows("r1", 0.5), rows("r2", 0.6).with_columns(pl.lit("all").alias("task_type"))]))


def test_wrong_direction_of_known_metric(tmp_path):
    path = _csv_with(tmp_path, "higher_is_better", "false")

    with pytest.raises(DataError) as caught:
        read_results(path)

    assert str(caught.value) == (
        f"{path}: row 2: metric 'dice' has higher_is_better false, but a higher dice is better; write true"
    )


def test_mixed_direction_of_one_metric():
    custom = pl.concat([rows("r1", 0.5), rows("r2", 0.6), rows("r3", 0.7)]).with_columns(
        pl.lit("lesion_score").alias("metric"), pl.Series("higher_is_better", [True, True, False])
    )

    with pytest.raises(DataError) as caught:
        validate_results(custom, origin="t.csv")

    message = str(caught.value)
    assert message.startswith("t.csv: rows 1 and 3: task 'lesion', metric 'lesion_score' has higher_is_better true")
    assert message.endswith("give every row of a metric the same direction")
    other_task = custom.with_columns(pl.Series("task", ["lesion", "lesion", "nodule"]))
    assert validate_results(other_task).height == 3


def test_csv_named_parquet_raises(tmp_path):
    path = tmp_path / "results.parquet"
    rows("r1", 0.5).write_csv(path)

    with pytest.raises(DataError) as caught:
        read_results(path)

    message = str(caught.value)
    assert message.startswith(f"{path}: cannot read as a parquet file (")
    assert message.endswith("if it is a CSV file, rename it to .csv")


def test_misspelled_column_suggests_name(tmp_path):
    path = tmp_path / "results.csv"
    rows("r1", 0.5).rename({"higher_is_better": "higher_is_beter"}).write_csv(path)

    with pytest.raises(DataError) as caught:
        read_results(path)

    message = str(caught.value)
    assert message.startswith(
        f"{path}: missing required column(s) higher_is_better (found 'higher_is_beter' for 'higher_is_better': "
        "rename them); "
    )


def test_semicolon_csv_names_delimiter(tmp_path):
    path = tmp_path / "results.csv"
    rows("r1", 0.5).write_csv(path, separator=";")

    with pytest.raises(DataError) as caught:
        read_results(path)

    assert "seems to separate columns with ';'; write it comma-separated" in str(caught.value)


def test_fraction_metric_outside_its_range(tmp_path):
    """A Dice typed as a percentage (91 for 0.91) would read as a 99 % loss; it is rejected with the fix."""
    with pytest.raises(DataError) as caught:
        read_results(_csv_with(tmp_path, "value", "91.0"))
    assert str(caught.value).endswith(
        "row 2: metric 'dice' has value 91, outside 0..1; write it as a fraction (write 0.91 for 91 %)"
    )
    with pytest.raises(DataError, match="row 2: metric 'dice' has value -0.2, outside 0..1; write it as a fraction$"):
        read_results(_csv_with(tmp_path, "value", "-0.2"))


def test_task_with_two_task_types(tmp_path):
    with pytest.raises(DataError) as caught:
        read_results(_csv_with(tmp_path, "task_type", "classification"))
    assert "rows 1 and 2: task 'lesion' has task_type 'segmentation' in one and 'classification' in the other" in str(caught.value)


def test_fractional_parquet_count_rejected(tmp_path):
    """A float column cast to a count would truncate 240.5 to 240 silently."""
    table = pl.concat([rows("r1", 0.5), rows("r2", 0.6)]).with_columns(pl.Series("n_train", [240.0, 240.5]))
    path = tmp_path / "results.parquet"
    table.write_parquet(path)
    with pytest.raises(DataError, match=r"row 2: column 'n_train' has 240.5, which is not a whole number"):
        read_results(path)
    table.with_columns(pl.Series("n_train", [240.0, 241.0])).write_parquet(path)
    assert read_results(path)["n_train"].to_list() == [240, 241]


def test_spaces_around_names_are_removed(tmp_path):
    path = tmp_path / "spaces.csv"
    rows("r1", 0.5).with_columns(pl.lit(" lesion ").alias("task"), pl.lit("grouped ").alias("paradigm")).write_csv(path)
    table = read_results(path)
    assert table["task"].to_list() == ["lesion"]
    assert table["paradigm"].to_list() == ["grouped"]
