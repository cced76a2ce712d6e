"""Which tasks should share a model? Partition search that maximises within-group affinity.

The score of a partition follows the network-selection objective of Standley et al. (ICML 2020) and Fifty et
al. (NeurIPS 2021): each task j in a group G with |G| ≥ 2 scores the mean affinity it receives from its group
mates, a_j(G) = mean_{i ∈ G, i ≠ j} A[i, j], and a task alone scores 0 (it loses nothing and gains nothing).
The total is Σ_G Σ_{j ∈ G} a_j(G). NaN entries (unmeasured pairs) are left out of the means, so joining two
tasks with no measured pair costs nothing. To keep such evidence-free merges out of ties, the search subtracts
``UNMEASURED_PENALTY`` per unmeasured ordered pair inside a group.
NOTE: the penalty is meant to decide ties only. An affinity difference below it (about 1e-9) would be decided
by the penalty too; the estimators here give differences many orders larger, but that is not checked.

Search: with up to ``EXHAUSTIVE_MAX_TASKS`` tasks, dynamic programming over subsets finds the exact best
partition into exactly K non-empty groups (every partition is covered, in O(3^T) time instead of listing the
Bell(T) partitions). Beyond that, a beam search assigns tasks one by one and a local search (moving one task or
swapping two) polishes the result. That search is a heuristic, and the result's ``method`` names it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from usagg.errors import AnalysisError

logger = logging.getLogger(__name__)

EXHAUSTIVE_MAX_TASKS = 12
BEAM_WIDTH = 64
UNMEASURED_PENALTY = 1e-9


@dataclass
class GroupingResult:
    """A recommended partition of the tasks with its score and the scores of each task."""

    tasks: list[str]
    k: int
    groups: list[list[str]]
    score: float
    task_scores: dict[str, float]
    method: str
    scores_by_k: dict[int, float] = field(default_factory=dict)
    taxonomy_score: float | None = None
    taxonomy_groups: dict[str, list[str]] | None = None
    random_score_mean: float | None = None
    random_score_p95: float | None = None
    affinity_method: str | None = None  # estimator whose matrix was partitioned, when the caller names it
    left_out: list[str] = field(default_factory=list)  # tasks of the study the affinity matrix has no entry for
    unmeasured_pairs: int = 0  # task pairs of the matrix with no value in either direction

    def as_mapping(self, prefix: str = "affinity") -> dict[str, list[str]]:
        """Return the groups as ``{name: [tasks]}``, largest group first."""
        return {f"{prefix}_{k + 1}": list(members) for k, members in enumerate(self.groups)}

    def to_yaml(self, prefix: str = "affinity", comment: str | None = None) -> str:
        """Return a ``groups:`` block that a study YAML can use as is, noting tasks it leaves out."""
        header = f"# {comment}\n" if comment else ""
        if self.left_out:
            header += f"# not grouped (no affinity entry): {', '.join(self.left_out)}; add them to a group by hand\n"
        body = yaml.safe_dump({"groups": self.as_mapping(prefix)}, default_flow_style=None, sort_keys=False)
        return header + body

    def summary(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "method": self.method,
            "affinity_method": self.affinity_method,
            "score": self.score,
            "groups": self.as_mapping(),
            "task_scores": self.task_scores,
            "scores_by_k": {str(k): v for k, v in self.scores_by_k.items()},
            "taxonomy_score": self.taxonomy_score,
            "taxonomy_groups": self.taxonomy_groups,
            "random_score_mean": self.random_score_mean,
            "random_score_p95": self.random_score_p95,
            "left_out": list(self.left_out),
            "unmeasured_pairs": self.unmeasured_pairs,
        }


def _prepare(affinity: tuple[Sequence[str], np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray]:
    tasks, matrix = list(affinity[0]), np.asarray(affinity[1], dtype=float)
    n = len(tasks)
    if matrix.shape != (n, n):
        raise AnalysisError(f"affinity matrix has shape {matrix.shape}; expected {n} × {n} for tasks {', '.join(tasks)}")
    if len(set(tasks)) != n:
        raise AnalysisError("affinity matrix: task names repeat")
    finite = np.isfinite(matrix) & ~np.eye(n, dtype=bool)
    values = np.where(finite, matrix, 0.0)
    return tasks, values, finite.astype(float)


def task_scores(affinity: tuple[Sequence[str], np.ndarray], groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """Return each task's mean affinity received from its group mates (0 alone or with no measured mate)."""
    tasks, values, finite = _prepare(affinity)
    index = {t: k for k, t in enumerate(tasks)}
    out: dict[str, float] = {}
    for members in groups:
        unknown = [m for m in members if m not in index]
        if unknown:
            raise AnalysisError(f"group {list(members)} names task(s) {', '.join(unknown)} missing from the affinity matrix")
        idx = [index[m] for m in members]
        for j in idx:
            mates = [i for i in idx if i != j]
            count = finite[mates, j].sum() if mates else 0.0
            out[tasks[j]] = float(values[mates, j].sum() / count) if count > 0 else 0.0
    return out


def partition_score(affinity: tuple[Sequence[str], np.ndarray], groups: Sequence[Sequence[str]]) -> float:
    """Return the total within-group affinity of a partition (see the module docstring)."""
    return float(sum(task_scores(affinity, groups).values()))


def _subset_scores(values: np.ndarray, finite: np.ndarray) -> np.ndarray:
    n = values.shape[0]
    masks = np.arange(1 << n)
    member = ((masks[:, None] >> np.arange(n)) & 1).astype(float)  # (2^n, n)
    sums = member @ values  # received affinity of task j from the members
    counts = member @ finite
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(counts > 0, sums / counts, 0.0)
    size = member.sum(axis=1)
    unmeasured = size * (size - 1) - (member * counts).sum(axis=1)
    return (member * means).sum(axis=1) - UNMEASURED_PENALTY * unmeasured


def _subset_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return all (S, T) with T ⊆ S, T non-empty and T holding the lowest task of S."""
    s_list, t_list = [], []
    full = (1 << n) - 1
    for t in range(1, 1 << n):
        low = (t & -t).bit_length() - 1
        # U may hold any task above `low` that T does not hold.
        free = [b for b in range(low + 1, n) if not (t >> b) & 1]
        if free:
            bits = (np.arange(1 << len(free))[:, None] >> np.arange(len(free))) & 1
            u = bits @ (1 << np.array(free))
        else:
            u = np.zeros(1, dtype=np.int64)
        s_list.append(t | u)
        t_list.append(np.full(u.shape, t))
    s = np.concatenate(s_list).astype(np.int64)
    t = np.concatenate(t_list).astype(np.int64)
    assert s.max() <= full
    return s, t


def _exhaustive(values: np.ndarray, finite: np.ndarray, k_values: Sequence[int]) -> dict[int, tuple[float, list[int]]]:
    """Return the best partition for every K in ``k_values`` by dynamic programming over subsets."""
    n = values.shape[0]
    score = _subset_scores(values, finite)
    s_idx, t_idx = _subset_pairs(n)

    size = 1 << n
    best = [np.full(size, -np.inf)]
    best[0][0] = 0.0
    choice: list[np.ndarray] = [np.zeros(size, dtype=np.int64)]
    for _ in range(1, max(k_values) + 1):
        candidate = score[t_idx] + best[-1][s_idx ^ t_idx]
        order = np.lexsort((candidate, s_idx))
        last = np.r_[s_idx[order][1:] != s_idx[order][:-1], True]
        top = order[last]
        level = np.full(size, -np.inf)
        pick = np.zeros(size, dtype=np.int64)
        level[s_idx[top]] = candidate[top]
        pick[s_idx[top]] = t_idx[top]
        best.append(level)
        choice.append(pick)

    full = size - 1
    out = {}
    for k in k_values:
        if not np.isfinite(best[k][full]):
            continue
        masks, rest = [], full
        for level in range(k, 0, -1):
            t = int(choice[level][rest])
            masks.append(t)
            rest ^= t
        out[k] = (float(best[k][full]), masks)
    return out


def _group_score(mask_members: list[int], values: np.ndarray, finite: np.ndarray, penalty: float = UNMEASURED_PENALTY) -> float:
    """Return the group's total received affinity, less ``penalty`` per unmeasured ordered pair (search only)."""
    if len(mask_members) < 2:
        return 0.0
    idx = np.array(mask_members)
    sub_v = values[np.ix_(idx, idx)]
    sub_f = finite[np.ix_(idx, idx)]
    counts = sub_f.sum(axis=0)
    unmeasured = len(idx) * (len(idx) - 1) - counts.sum()
    return float(np.sum(np.where(counts > 0, sub_v.sum(axis=0) / np.maximum(counts, 1), 0.0))) - penalty * unmeasured


def _beam(values: np.ndarray, finite: np.ndarray, k: int, width: int) -> tuple[float, list[list[int]]]:
    """Beam search over task-by-task assignments into ``k`` groups, followed by a local search."""
    n = values.shape[0]
    # Tasks with the strongest ties go first, so early choices rest on the largest affinities.
    strength = np.abs(values).sum(axis=0) + np.abs(values).sum(axis=1)
    order = list(np.argsort(-strength))
    beam: list[tuple[float, tuple[tuple[int, ...], ...]]] = [(0.0, ())]
    cache: dict[tuple[int, ...], float] = {}

    def score_of(group: tuple[int, ...]) -> float:
        if group not in cache:
            cache[group] = _group_score(list(group), values, finite)
        return cache[group]

    for step, task in enumerate(order):
        remaining = n - step - 1
        expanded: dict[tuple[tuple[int, ...], ...], float] = {}
        for total, groups in beam:
            options = []
            for g, members in enumerate(groups):
                new_group = tuple(sorted((*members, task)))
                new_groups = groups[:g] + (new_group,) + groups[g + 1 :]
                options.append((total - score_of(members) + score_of(new_group), new_groups))
            if len(groups) < k:
                options.append((total, groups + ((task,),)))
            for new_total, new_groups in options:
                if len(new_groups) + remaining < k:
                    continue  # too few tasks left to open the missing groups
                key = tuple(sorted(new_groups))
                if key not in expanded or expanded[key] < new_total:
                    expanded[key] = new_total
        beam = sorted(((v, g) for g, v in expanded.items()), key=lambda item: -item[0])[:width]
    total, groups = beam[0]
    return _local_search(total, [list(g) for g in groups], score_of)


def _local_search(total, groups, score_of) -> tuple[float, list[list[int]]]:
    """Apply improving moves (one task to another group) and swaps (two tasks) until none improves the total."""

    def pair_score(first: list[int], second: list[int]) -> float:
        return score_of(tuple(sorted(first))) + score_of(tuple(sorted(second)))

    while True:
        change = _first_improvement(groups, pair_score)
        if change is None:
            return total, groups
        a, b, new_a, new_b, gain = change
        groups[a], groups[b] = new_a, new_b
        total += gain
        groups = [g for g in groups if g]


def _first_improvement(groups, pair_score):
    """Return (a, b, new group a, new group b, gain) of the first improving move or swap, or None."""
    for a, b in itertools.permutations(range(len(groups)), 2):
        old = pair_score(groups[a], groups[b])
        # Moving the last task out of a group would remove the group and change K.
        if len(groups[a]) > 1:
            for task in groups[a]:
                new_a = [t for t in groups[a] if t != task]
                new_b = [*groups[b], task]
                gain = pair_score(new_a, new_b) - old
                if gain > 1e-12:
                    return a, b, new_a, new_b, gain
        if a > b:
            continue  # each pair of groups is tried for swaps once
        for task_a in groups[a]:
            for task_b in groups[b]:
                new_a = [task_b if t == task_a else t for t in groups[a]]
                new_b = [task_a if t == task_b else t for t in groups[b]]
                gain = pair_score(new_a, new_b) - old
                if gain > 1e-12:
                    return a, b, new_a, new_b, gain
    return None


def _ordered(tasks: list[str], groups_idx: list[list[int]]) -> list[list[str]]:
    named = [sorted(tasks[i] for i in g) for g in groups_idx if g]
    return sorted(named, key=lambda g: (-len(g), g))


def _masks_to_groups(masks: list[int], n: int) -> list[list[int]]:
    return [[b for b in range(n) if (m >> b) & 1] for m in masks]


def recommend_groups(
    affinity: tuple[Sequence[str], np.ndarray],
    k: int | str = "auto",
    taxonomy: Mapping[str, str] | Mapping[str, Sequence[str]] | None = None,
    beam_width: int = BEAM_WIDTH,
    n_random: int = 1000,
    seed: int = 0,
) -> GroupingResult:
    """Partition the tasks into ``k`` groups (or the best number of groups for ``"auto"``) by total affinity.

    ``affinity`` is (task names, matrix) with rows = source and columns = target. ``taxonomy`` is either
    task → clinical group or group → tasks; its partition is scored with the same objective for comparison.
    A random baseline (the mean and 95th percentile of ``n_random`` random partitions with the recommended
    group sizes) shows how much of the score structure explains.
    """
    tasks, values, finite = _prepare(affinity)
    n = len(tasks)
    if n == 0:
        raise AnalysisError("recommend_groups: the affinity matrix has no tasks")
    auto = isinstance(k, str)
    if auto and k != "auto":
        raise AnalysisError(f"number of groups {k!r} is invalid; give an integer from 1 to {n} or 'auto'")
    if not auto and not 1 <= int(k) <= n:
        raise AnalysisError(f"number of groups {k} is invalid for {n} tasks; give an integer from 1 to {n} or 'auto'")

    scores_by_k: dict[int, float] = {}
    if n <= EXHAUSTIVE_MAX_TASKS:
        k_values = list(range(1, n + 1)) if auto else [int(k)]
        found = _exhaustive(values, finite, k_values)
        scores_by_k = {kk: v[0] for kk, v in found.items()}
        # Ties go to fewer groups: fewer models to train for the same score.
        chosen = max(found, key=lambda kk: (round(found[kk][0], 12), -kk)) if auto else int(k)
        total, masks = found[chosen]
        groups_idx = _masks_to_groups(masks, n)
        method = "exhaustive"
    else:
        # With "auto" every K is searched on its own: one search with K free commits to a number of groups early
        # and can end below the best fixed K.
        found_beam = {kk: _beam(values, finite, kk, beam_width) for kk in (range(1, n + 1) if auto else [int(k)])}
        scores_by_k = {kk: v[0] for kk, v in found_beam.items()}
        chosen = max(found_beam, key=lambda kk: (round(found_beam[kk][0], 12), -kk))
        total, groups_idx = found_beam[chosen]
        method = f"beam search (width {beam_width}) + local search"
    groups = _ordered(tasks, groups_idx)
    per_task = task_scores((tasks, np.where(finite > 0, values, np.nan)), groups)
    result = GroupingResult(
        tasks=tasks, k=len(groups), groups=groups, score=float(sum(per_task.values())),
        task_scores=per_task, method=method, scores_by_k=scores_by_k,
    )
    if not math.isclose(result.score, total, rel_tol=1e-9, abs_tol=1e-9):
        logger.debug("grouping: search total %.6g differs from the rescored total %.6g", total, result.score)

    if taxonomy:
        partition = _taxonomy_partition(taxonomy, tasks)
        result.taxonomy_groups = partition
        result.taxonomy_score = partition_score((tasks, np.where(finite > 0, values, np.nan)), list(partition.values()))
    if n_random > 0 and n > 1:
        rng = np.random.default_rng(seed)
        sizes = [len(g) for g in groups]
        draws = []
        for _ in range(n_random):
            perm = rng.permutation(n)
            start, random_groups = 0, []
            for size in sizes:
                random_groups.append(list(perm[start : start + size]))
                start += size
            # Scored as the recommendation and the taxonomy are reported: without the search's tie-break penalty.
            draws.append(sum(_group_score(g, values, finite, penalty=0.0) for g in random_groups))
        result.random_score_mean = float(np.mean(draws))
        result.random_score_p95 = float(np.percentile(draws, 95))
    return result


def _taxonomy_partition(taxonomy: Mapping[str, Any], tasks: list[str]) -> dict[str, list[str]]:
    values = list(taxonomy.values())
    if values and isinstance(values[0], str):
        partition: dict[str, list[str]] = {}
        for task in tasks:
            partition.setdefault(str(taxonomy.get(task, f"(no group) {task}")), []).append(task)
    else:
        partition = {str(g): [t for t in members if t in tasks] for g, members in taxonomy.items()}
        placed = {t for members in partition.values() for t in members}
        for task in tasks:
            if task not in placed:
                partition[f"(no group) {task}"] = [task]
    return {g: m for g, m in partition.items() if m}
