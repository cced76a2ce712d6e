"""Learning-rate schedule and loss weighting."""

from __future__ import annotations

import math

import pytest
import torch

from usagg.config import TrainConfig
from usagg.errors import ConfigError
from usagg.train.optim import LossWeighting, WarmupCosine, build_scheduler


def test_warmup_cosine_factors():
    factor = WarmupCosine(total_steps=10, warmup_steps=2, min_factor=0.1)
    assert factor(0) == pytest.approx(0.5)
    assert factor(1) == pytest.approx(1.0)
    assert factor(2) == pytest.approx(1.0)
    # Halfway through the cosine part (step 6 of 2..10) the factor is halfway between 1 and 0.1.
    assert factor(6) == pytest.approx(0.55)
    assert factor(10) == pytest.approx(0.1)


def test_scheduler_scales_each_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    scheduler = build_scheduler(optimizer, TrainConfig(warmup_fraction=0.0), total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx([1.0, 0.1])
    assert lrs[2] == pytest.approx([0.5, 0.05])


def test_uncertainty_weighting_value_by_hand():
    weighting = LossWeighting(["a", "b"], "uncertainty")
    with torch.no_grad():
        weighting.log_vars["a"].fill_(math.log(2.0))
    total = weighting("a", torch.tensor(3.0))
    # 0.5 * exp(-s) * L + 0.5 * log(1 + exp(s)) with exp(s) = 2.
    assert total.item() == pytest.approx(0.5 * 3.0 / 2.0 + 0.5 * math.log(3.0))
    assert weighting.weights()["a"] == pytest.approx(0.25)


def test_uncertainty_weighting_bounded_below():
    weighting = LossWeighting(["a"], "uncertainty")
    optimizer = torch.optim.SGD(weighting.parameters(), lr=1.0)
    for _ in range(200):
        total = weighting("a", torch.tensor(1e-6))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert weighting("a", torch.tensor(1e-6)).item() >= 0.0
    assert weighting("a", torch.tensor(0.0)).item() >= 0.0


def test_fixed_weighting():
    weighting = LossWeighting(["a", "b"], "fixed", {"a": 2.0, "b": 0.5})
    assert float(weighting("a", torch.tensor(3.0))) == pytest.approx(6.0)
    assert list(weighting.parameters()) == []
    with pytest.raises(ConfigError, match="no weight for task"):
        LossWeighting(["a", "c"], "fixed", {"a": 1.0})


def test_equal_weighting_is_identity():
    weighting = LossWeighting(["a"], "equal")
    assert float(weighting("a", torch.tensor(1.5))) == 1.5
