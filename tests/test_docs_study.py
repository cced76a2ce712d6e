"""docs/study.md names every key of a study file, a task card and each data source, and every allowed value."""

from __future__ import annotations

import typing
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from usagg.config import AugmentConfig, StudyConfig
from usagg.tasks import FORMATS_BY_KIND, SOURCE_FORMATS, SourceConfig, TaskCard

STUDY_DOC = Path(__file__).resolve().parents[1] / "docs" / "study.md"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Return the pydantic models inside a field annotation, through Optional, list, dict, Annotated and unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _config_models() -> list[type[BaseModel]]:
    """Return StudyConfig, TaskCard, every source model and every model nested in them, each once."""
    ordered: list[type[BaseModel]] = []
    pending = [StudyConfig, TaskCard, *_models_in(SourceConfig)]
    while pending:
        model = pending.pop(0)
        if model in ordered:
            continue
        ordered.append(model)
        for field in model.model_fields.values():
            pending += _models_in(field.annotation)
    return ordered


def _allowed_values(annotation: Any) -> list[str]:
    """Return the values a Literal or Enum inside an annotation allows, as written in YAML."""
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(member.value) for member in annotation]
    if typing.get_origin(annotation) is Literal:
        return [str(value) for value in typing.get_args(annotation)]
    values: list[str] = []
    for arg in typing.get_args(annotation):
        values += _allowed_values(arg)
    return values


@lru_cache(maxsize=1)
def _doc_text() -> str:
    return STUDY_DOC.read_text(encoding="utf-8")


FIELDS = [(model.__name__, name) for model in _config_models() for name in model.model_fields]
VALUES = sorted(
    {
        (model.__name__, name, value)
        for model in _config_models()
        for name, field in model.model_fields.items()
        for value in _allowed_values(field.annotation)
    }
)


def test_model_walk_reaches_nested_models():
    names = {model.__name__ for model in _config_models()}
    formats = {value for _, name, value in VALUES if name == "format"}

    assert AugmentConfig.__name__ in names  # two levels down: StudyConfig.data.augment
    assert {"DataConfig", "ModelConfig", "TrainConfig", "EvalConfig"} <= names
    assert formats == set(SOURCE_FORMATS)
    assert len(FIELDS) > 100


@pytest.mark.parametrize(("model", "field"), FIELDS, ids=[f"{model}.{field}" for model, field in FIELDS])
def test_study_doc_names_field(model: str, field: str):
    assert f"`{field}`" in _doc_text(), f"docs/study.md does not mention `{field}`; add it to the table of {model}"


@pytest.mark.parametrize(
    ("model", "field", "value"), VALUES, ids=[f"{model}.{field}={value}" for model, field, value in VALUES]
)
def test_study_doc_names_allowed_value(model: str, field: str, value: str):
    assert f"`{value}`" in _doc_text(), f"docs/study.md does not mention `{value}`, a value of {model}.{field}"


@pytest.mark.parametrize("kind", sorted(FORMATS_BY_KIND))
def test_study_doc_lists_formats_of_kind(kind: str):
    text = _doc_text()

    for source_format in FORMATS_BY_KIND[kind]:
        assert f"`{source_format}`" in text, f"docs/study.md does not mention source format `{source_format}`"
    row = next((line for line in text.splitlines() if line.startswith("|") and f"| `{kind}` |" in line), None)
    assert row is not None, f"docs/study.md has no table row for task kind `{kind}`"
    for source_format in FORMATS_BY_KIND[kind]:
        assert f"`{source_format}`" in row, f"the `{kind}` row of docs/study.md does not list format `{source_format}`"
