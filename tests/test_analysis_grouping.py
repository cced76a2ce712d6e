"""Grouping search: exhaustive equals brute force, planted clusters are found, YAML output loads into a study."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from usagg.analysis.grouping import EXHAUSTIVE_MAX_TASKS, partition_score, recommend_groups, task_scores
from usagg.config import StudyConfig
from usagg.errors import AnalysisError


def all_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in all_partitions(rest):
        for k in range(len(partition)):
            yield partition[:k] + [[first, *partition[k]]] + partition[k + 1 :]
        yield [[first], *partition]


def planted(n_tasks, n_clusters, noise, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n_tasks) % n_clusters
    matrix = np.where(labels[:, None] == labels[None, :], 0.5, -0.3) + rng.normal(0, noise, (n_tasks, n_tasks))
    np.fill_diagonal(matrix, np.nan)
    tasks = [f"t{k:02d}" for k in range(n_tasks)]
    truth = sorted(sorted(tasks[k] for k in range(n_tasks) if labels[k] == c) for c in range(n_clusters))
    return tasks, matrix, truth


def test_task_scores_known_values():
    matrix = np.array([[np.nan, 0.2, 0.4], [0.6, np.nan, -0.2], [0.0, 1.0, np.nan]])
    scores = task_scores((["a", "b", "c"], matrix), [["a", "b", "c"]])
    assert scores == pytest.approx({"a": 0.3, "b": 0.6, "c": 0.1})  # column means: what each task receives
    assert task_scores((["a", "b", "c"], matrix), [["a"], ["b", "c"]]) == pytest.approx({"a": 0.0, "b": 1.0, "c": -0.2})


def test_unmeasured_pairs_are_left_out_of_the_mean():
    matrix = np.array([[np.nan, 0.2, np.nan], [0.6, np.nan, -0.2], [np.nan, 1.0, np.nan]])
    scores = task_scores((["a", "b", "c"], matrix), [["a", "b", "c"]])
    assert scores["a"] == pytest.approx(0.6)
    assert scores["c"] == pytest.approx(-0.2)


def test_exhaustive_equals_brute_force():
    rng = np.random.default_rng(4)
    tasks = [f"x{k}" for k in range(7)]
    matrix = rng.normal(size=(7, 7))
    best = {}
    for partition in all_partitions(tasks):
        score = partition_score((tasks, matrix), partition)
        if len(partition) not in best or score > best[len(partition)]:
            best[len(partition)] = score
    for k in range(1, 8):
        result = recommend_groups((tasks, matrix), k, n_random=0)
        assert result.method == "exhaustive"
        assert result.k == k
        assert result.score == pytest.approx(best[k])
    auto = recommend_groups((tasks, matrix), "auto", n_random=0)
    assert auto.score == pytest.approx(max(best.values()))


def test_planted_clusters_found_exhaustively():
    tasks, matrix, truth = planted(9, 3, 0.05, seed=0)
    result = recommend_groups((tasks, matrix), 3)
    assert sorted(result.groups) == truth
    assert recommend_groups((tasks, matrix), "auto").k == 3
    assert result.random_score_mean < result.score


def test_beam_search_finds_planted_clusters():
    tasks, matrix, truth = planted(20, 4, 0.05, seed=1)
    result = recommend_groups((tasks, matrix), 4, n_random=50)
    assert result.method.startswith("beam search")
    assert sorted(result.groups) == truth
    assert result.score == pytest.approx(partition_score((tasks, matrix), truth))


def test_taxonomy_scored_beside_recommendation():
    tasks, matrix, truth = planted(6, 2, 0.0, seed=2)
    taxonomy = {t: ("left" if t in ("t00", "t01", "t02") else "right") for t in tasks}
    result = recommend_groups((tasks, matrix), 2, taxonomy=taxonomy)
    assert result.taxonomy_score == pytest.approx(partition_score((tasks, matrix), [["t00", "t01", "t02"], ["t03", "t04", "t05"]]))
    assert result.taxonomy_score < result.score
    by_group = recommend_groups((tasks, matrix), 2, taxonomy={"g": ["t00", "t02"]})
    assert "(no group) t01" in by_group.taxonomy_groups


def test_groups_yaml_is_a_valid_study_block():
    tasks, matrix, _ = planted(6, 2, 0.05, seed=3)
    result = recommend_groups((tasks, matrix), 2)
    text = result.to_yaml(comment="test")
    assert text.startswith("# test\ngroups:")
    groups = yaml.safe_load(text)["groups"]
    cards = [{"name": t, "type": "classification", "num_classes": 2} for t in tasks]
    study = StudyConfig.model_validate({"name": "s", "tasks": cards, "groups": groups})
    assert study.group_partition() == groups


def test_invalid_k_raises():
    tasks, matrix, _ = planted(4, 2, 0.0, seed=0)
    with pytest.raises(AnalysisError, match="from 1 to 4"):
        recommend_groups((tasks, matrix), 5)
    with pytest.raises(AnalysisError, match="'auto'"):
        recommend_groups((tasks, matrix), "best")
    with pytest.raises(AnalysisError, match="shape"):
        recommend_groups((tasks, matrix[:3]), 2)


def test_unmeasured_pairs_are_not_merged_on_a_tie():
    """Two measured pairs and no evidence between them: auto keeps the pairs apart instead of merging all four."""
    nan = float("nan")
    matrix = np.array([
        [nan, 0.2, nan, nan],
        [0.2, nan, nan, nan],
        [nan, nan, nan, 0.1],
        [nan, nan, 0.1, nan],
    ])
    result = recommend_groups((["a", "b", "c", "d"], matrix), "auto", n_random=0)
    assert sorted(map(sorted, result.groups)) == [["a", "b"], ["c", "d"]]
    assert result.score == pytest.approx(0.6)


def test_auto_beyond_exhaustive_is_best_fixed_k():
    """Past the exhaustive limit, "auto" searches every K and keeps the best, so no fixed K scores higher."""
    rng = np.random.default_rng(0)
    n = EXHAUSTIVE_MAX_TASKS + 3
    values = rng.normal(size=(n, n))
    values = (values + values.T) / 2
    tasks = [f"t{i}" for i in range(n)]
    auto = recommend_groups((tasks, values), "auto", n_random=0)
    assert auto.method.startswith("beam search")
    assert sorted(auto.scores_by_k) == list(range(1, n + 1))
    for k in (3, auto.k, n - 2):
        assert recommend_groups((tasks, values), k, n_random=0).score <= auto.score + 1e-9
