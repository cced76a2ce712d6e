"""Study and task-card loading: valid files load, invalid ones fail naming file, key and value."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from usagg.config import load_study, load_task_card, study_to_yaml
from usagg.errors import ConfigError

VALID_STUDY = """
name: demo
output: out
tasks:
  - name: lesion
    type: segmentation
    organ: breast
    num_classes: 2
    source: {format: fmc_uia, root: data/train, val_root: data/val}
  - name: lesion_cls
    type: classification
    organ: breast
    num_classes: 2
  - name: head_axis
    type: regression
    organ: fetal_head
    group: obstetrics
    num_keypoints: 2
  - name: head_circumference
    type: regression
    organ: fetal_head
    group: obstetrics
    target: head_circumference_mm
    unit: mm
fractions: [1.0, 0.25]
model: {backbone: vit_tiny_patch16_dinov3_qkvb, depth: 2}
"""


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_study(path)
    return str(info.value)


def test_valid_study_loads_with_defaults(tmp_path):
    study = load_study(write(tmp_path, VALID_STUDY))
    assert [t.name for t in study.tasks] == ["lesion", "lesion_cls", "head_axis", "head_circumference"]
    assert study.fractions == [0.25, 1.0]
    assert study.model.backbone == "vit_tiny_patch16_dinov3_qkvb"
    assert study.tasks[2].kind == "keypoints"
    assert study.tasks[3].kind == "scalar"
    assert study.tasks[0].primary_metric == "dice"
    assert study.tasks[2].hflip_allowed is False


def test_paths_resolve_relative_to_study(tmp_path):
    study = load_study(write(tmp_path, VALID_STUDY))
    assert study.output == tmp_path / "out"
    assert study.tasks[0].source.root == tmp_path / "data" / "train"
    assert study.tasks[0].source.val_root == tmp_path / "data" / "val"


def test_default_groups_follow_cards(tmp_path):
    study = load_study(write(tmp_path, VALID_STUDY))
    assert study.group_partition() == {
        "breast": ["lesion", "lesion_cls"],
        "obstetrics": ["head_axis", "head_circumference"],
    }


def test_env_variable_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_DATA", str(tmp_path / "elsewhere"))
    text = VALID_STUDY.replace("root: data/train", "root: '${MY_DATA}/train'")
    study = load_study(write(tmp_path, text))
    assert study.tasks[0].source.root == tmp_path / "elsewhere" / "train"


def test_env_variable_default_used(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_DATA", raising=False)
    text = VALID_STUDY.replace("root: data/train", "root: '${MY_DATA:-fallback}/train'")
    study = load_study(write(tmp_path, text))
    assert study.tasks[0].source.root == tmp_path / "fallback" / "train"
    monkeypatch.setenv("MY_DATA", "")  # set but empty takes the default, as in the shell
    assert load_study(write(tmp_path, text)).tasks[0].source.root == tmp_path / "fallback" / "train"


def test_unset_env_variable_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FMC_TEST_ROOT", raising=False)
    path = write(tmp_path, VALID_STUDY.replace("root: data/train", "root: '${FMC_TEST_ROOT}'"))
    message = error_of(path)
    assert str(path) in message
    assert "tasks[0] (lesion).source.root" in message
    assert "FMC_TEST_ROOT" in message


def test_unknown_key_lists_allowed_keys(tmp_path):
    message = error_of(write(tmp_path, VALID_STUDY + "train: {epochz: 3}\n"))
    assert "train.epochz" in message
    assert "unknown key" in message
    assert "epochs" in message


def test_unknown_source_key_lists_source_keys(tmp_path):
    text = VALID_STUDY.replace("val_root: data/val", "val_rot: data/val")
    message = error_of(write(tmp_path, text))
    assert "tasks[0] (lesion).source.val_rot" in message
    assert "val_root" in message


def test_wrong_type_names_value(tmp_path):
    message = error_of(write(tmp_path, VALID_STUDY + "train: {batch_size: many}\n"))
    assert "train.batch_size" in message
    assert "'many'" in message


def test_missing_required_field(tmp_path):
    message = error_of(write(tmp_path, "tasks: []\n"))
    assert "name: required field is missing" in message


def test_unknown_task_type_lists_allowed(tmp_path):
    text = VALID_STUDY.replace("type: classification", "type: ranking")
    message = error_of(write(tmp_path, text))
    assert "tasks[1] (lesion_cls).type" in message
    assert "'ranking'" in message
    assert "'segmentation'" in message


def test_unknown_source_format_lists_allowed(tmp_path):
    text = VALID_STUDY.replace("format: fmc_uia", "format: nifti")
    message = error_of(write(tmp_path, text))
    assert "tasks[0] (lesion).source.format: unknown source format 'nifti'" in message
    assert "valid source formats: fmc_uia, mask_folder, class_csv" in message


def test_group_with_unknown_task(tmp_path):
    message = error_of(write(tmp_path, VALID_STUDY + "groups: {breast: [lesion, thyroid_nodule]}\n"))
    assert "groups.breast" in message
    assert "thyroid_nodule" in message


def test_task_in_two_groups(tmp_path):
    message = error_of(write(tmp_path, VALID_STUDY + "groups: {a: [lesion], b: [lesion]}\n"))
    assert "groups.b" in message
    assert "'lesion'" in message


def test_regression_needs_points_or_target(tmp_path):
    text = VALID_STUDY.replace("    num_keypoints: 2\n", "")
    message = error_of(write(tmp_path, text))
    assert "tasks[2]" in message
    assert "num_keypoints" in message


def test_image_size_must_be_patch_multiple(tmp_path):
    message = error_of(write(tmp_path, VALID_STUDY + "data: {img_size: 100}\n"))
    assert "data.img_size" in message
    assert "multiple of the 16 px patch size" in message


def test_invalid_yaml_names_line(tmp_path):
    message = error_of(write(tmp_path, "name: demo\ntasks: [\n"))
    assert "invalid YAML at line" in message


def test_missing_file(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert "file not found" in message


def test_task_card_file_included(tmp_path):
    (tmp_path / "cards").mkdir()
    write(
        tmp_path / "cards",
        "name: lesion\ntype: segmentation\nnum_classes: 2\nsource: {format: mask_folder, root: bus}\n",
        "lesion.yaml",
    )
    study = load_study(write(tmp_path, "name: demo\ntasks: [cards/lesion.yaml]\n"))
    assert study.tasks[0].source.root == tmp_path / "cards" / "bus"


def test_bad_task_card_file_names_both_files(tmp_path):
    card = write(tmp_path, "name: lesion\ntype: segmentation\n", "card.yaml")
    message = error_of(write(tmp_path, "name: demo\ntasks: [card.yaml]\n"))
    assert "study.yaml: tasks[0]" in message
    assert str(card) in message
    assert "num_classes >= 2" in message


def test_load_task_card_alone(tmp_path):
    card = load_task_card(write(tmp_path, "name: c\ntype: classification\nnum_classes: 3\n", "c.yaml"))
    assert card.num_classes == 3


def test_overrides_apply_before_validation(tmp_path):
    study = load_study(write(tmp_path, VALID_STUDY), overrides={"train.epochs": 2.5})
    assert study.train.epochs == 2.5


def test_nested_override_keeps_other_keys(tmp_path):
    plain = load_study(write(tmp_path, VALID_STUDY))
    study = load_study(write(tmp_path, VALID_STUDY), overrides={"train": {"epochs": 2.5}})
    assert study.train.epochs == 2.5
    assert study.train.batch_size == plain.train.batch_size
    assert study.model == plain.model


def test_overrides_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"overrides must be a mapping of dotted keys to values, .*got list"):
        load_study(write(tmp_path, VALID_STUDY), overrides=["train.epochs=2"])


def test_override_error_names_command_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, VALID_STUDY), overrides={"train.epoch": 2})
    message = str(info.value)
    assert "train.epoch: unknown key" in message
    assert "comes from an override (train.epoch, --set on the command line)" in message


def test_amp_off_unquoted(tmp_path):
    study = load_study(write(tmp_path, VALID_STUDY + "train: {amp: off}\n"))
    assert study.train.amp == "off"
    study = load_study(write(tmp_path, VALID_STUDY), overrides={"train.amp": False})
    assert study.train.amp == "off"


def test_override_into_list_item(tmp_path):
    study = load_study(write(tmp_path, VALID_STUDY), overrides={"tasks.1.num_classes": 3})
    assert study.tasks[1].num_classes == 3


def test_override_bad_list_index(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, VALID_STUDY), overrides={"tasks.lesion.num_classes": 3})
    assert str(info.value) == (
        "--set tasks.lesion.num_classes: tasks is a list of 4 item(s), so the next part must be an index from 0 "
        "to 3, got 'lesion' (for example --set tasks.0.num_classes=VALUE)"
    )
    with pytest.raises(ConfigError, match="index from 0 to 3, got '4'"):
        load_study(write(tmp_path, VALID_STUDY), overrides={"tasks.4.num_classes": 3})


def test_override_below_scalar(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, VALID_STUDY), overrides={"model.depth.x": 1})
    assert str(info.value) == (
        "--set model.depth.x: model.depth is a single value (2), so it has no key 'x'; "
        "set model.depth itself (--set model.depth=VALUE)"
    )


def test_file_error_not_blamed_on_override(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, VALID_STUDY + "bogus: 1\n"), overrides={"train.epochs": 2})
    assert "bogus: unknown key" in str(info.value)
    assert "command line" not in str(info.value)


def test_resolved_study_round_trips(tmp_path):
    study = load_study(write(tmp_path, VALID_STUDY))
    again = write(tmp_path, study_to_yaml(study), "resolved.yaml")
    assert load_study(again) == study


def test_list_item_named_with_index(tmp_path):
    text = VALID_STUDY.replace("    num_classes: 2\n  - name: head_axis", "    num_clases: 2\n  - name: head_axis")
    message = error_of(write(tmp_path, text))
    assert "tasks[1] (lesion_cls).num_clases: unknown key" in message


def test_list_item_without_name_keeps_index(tmp_path):
    text = VALID_STUDY.replace("fractions:", "  - {type: classification, num_classes: 2}\nfractions:")
    message = error_of(write(tmp_path, text))
    assert "tasks[4].name: required field is missing" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("big", "data.img_size: must be an integer or a list of 2 integers (one side or [height, width] in pixels, multiples of 16); got 'big'"),
        ("[1, 2, 3]", "data.img_size: must be an integer or a list of 2 integers (one side or [height, width] in pixels, multiples of 16); got [1, 2, 3]"),
        ("[big, 224]", "data.img_size[0]: Input should be a valid integer, unable to parse string as an integer (got 'big')"),
    ],
)
def test_union_value_is_one_plain_message(tmp_path, value, expected):
    message = error_of(write(tmp_path, VALID_STUDY + f"data: {{img_size: {value}}}\n"))
    lines = message.splitlines()
    assert len(lines) == 1, message
    assert lines[0].endswith(expected), message
    assert "tuple[" not in message
    assert ".int:" not in message


def test_unknown_source_format_is_plain(tmp_path):
    message = error_of(write(tmp_path, VALID_STUDY.replace("format: fmc_uia", "format: csv")))
    assert message.endswith(
        "study.yaml: tasks[0] (lesion).source.format: unknown source format 'csv'; valid source formats: fmc_uia, "
        "mask_folder, class_csv, class_folders, coco, keypoint_csv, scalar_csv"
    ), message
    assert "Input tag" not in message


def test_missing_source_format_lists_formats(tmp_path):
    message = error_of(write(tmp_path, VALID_STUDY.replace("format: fmc_uia, ", "")))
    assert "tasks[0] (lesion).source.format: required field is missing; valid source formats: fmc_uia, mask_folder" in message
    assert "discriminator" not in message


def test_card_file_unknown_format(tmp_path):
    card = write(tmp_path, "name: lesion\ntype: segmentation\nnum_classes: 2\nsource: {format: png, root: x}\n", "card.yaml")
    with pytest.raises(ConfigError) as info:
        load_task_card(card)
    assert "source.format: unknown source format 'png'; valid source formats: fmc_uia" in str(info.value)


def test_list_item_override_names_command_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_study(write(tmp_path, VALID_STUDY), overrides={"tasks.1.num_classes": "many"})
    message = str(info.value)
    assert "tasks[1] (lesion_cls).num_classes" in message
    assert "comes from an override (tasks.1.num_classes, --set on the command line)" in message


def test_group_name_with_slash_rejected(tmp_path):
    message = error_of(write(tmp_path, VALID_STUDY + "groups: {b/c: [lesion], rest: [lesion_cls, head_axis, head_circumference]}\n"))
    assert "groups.b/c: group name 'b/c' must start with a letter or digit" in message


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        ("type: segmentation\nnum_classes: 2\nsource: {format: class_csv, root: x}",
         "source format 'class_csv' has no segmentation labels; a segmentation task reads 'fmc_uia' or 'mask_folder'"),
        ("type: classification\nnum_classes: 2\nsource: {format: mask_folder, root: x}",
         "source format 'mask_folder' has no classification labels; a classification task reads 'fmc_uia' or "
         "'class_csv' or 'class_folders'"),
        ("type: regression\nnum_keypoints: 2\nsource: {format: scalar_csv, root: x}",
         "source format 'scalar_csv' has no keypoint regression labels; a keypoint regression task reads 'fmc_uia' "
         "or 'keypoint_csv'"),
        ("type: regression\ntarget: hc_mm\nsource: {format: fmc_uia, root: x}",
         "source format 'fmc_uia' has no scalar regression labels; a scalar regression task reads 'scalar_csv'"),
    ],
)
def test_card_type_must_match_source_format(tmp_path, card, expected):
    """A source that cannot supply the card's labels is rejected on load, before any data is read."""
    with pytest.raises(ConfigError) as info:
        load_task_card(write(tmp_path, f"name: t\n{card}\n", "card.yaml"))
    assert expected + ": change the card's type or its source" in str(info.value)


def test_metric_must_be_computed_for_the_kind(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_task_card(write(tmp_path, "name: t\ntype: classification\nnum_classes: 2\nmetric: dice\n", "card.yaml"))
    assert "metric 'dice' is not computed for classification tasks; choose one of auc, accuracy" in str(info.value)
    message = error_of(write(tmp_path, VALID_STUDY + "evaluation:\n  primary_metrics: {segmentaton: dice}\n"))
    assert "unknown task kind 'segmentaton'" in message
    message = error_of(write(tmp_path, VALID_STUDY + "evaluation:\n  primary_metrics: {keypoints: dice}\n"))
    assert "metric 'dice' is not computed for keypoints tasks; choose one of mre_px, mre_mm" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # Lists that would plan the same run twice or a run without tasks.
        ("seeds: [0, 1, 0]\n", "seeds lists 0 more than once"),
        ("paradigms: [unified, unified]\n", "paradigms lists unified more than once"),
        ("pairs: [[lesion, lesion]]\n", "pairs: ['lesion', 'lesion'] pairs a task with itself"),
        ("groups: {a: [lesion, lesion_cls, head_axis, head_circumference], b: []}\n", "groups.b: the group has no tasks"),
        # Settings that leave nothing to train.
        ("data: {val_fraction: 0.6, test_fraction: 0.5}\n", "add up to 1 or more, which leaves no training images"),
        ("seeds: []\n", "seeds: List should have at least 1 item"),
        ("paradigms: []\n", "paradigms: List should have at least 1 item"),
    ],
)
def test_invalid_study_lists_rejected(tmp_path, extra, expected):
    assert expected in error_of(write(tmp_path, VALID_STUDY + extra))


def test_study_name_must_be_folder_name(tmp_path):
    message = error_of(write(tmp_path, VALID_STUDY.replace("name: ", "name: a/", 1)))
    assert "must start with a letter or digit" in message


def test_empty_tasks_and_path_rejected(tmp_path):
    assert "tasks: List should have at least 1 item" in error_of(write(tmp_path, "name: demo\ntasks: []\n"))
    message = error_of(write(tmp_path, VALID_STUDY.replace("root: data/train", "root: ''")))
    assert "source.root: the path is empty" in message


def test_detection_classes_from_class_names(tmp_path):
    card = load_task_card(write(tmp_path, "name: d\ntype: detection\nclass_names: [lesion, cyst]\n", "card.yaml"))
    assert card.num_classes == 2
