"""Checkpoint files: round trips, pointer replacement, crash safety and RNG state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from usagg.errors import TrainingError
from usagg.train import checkpoint as ckpt


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_checkpoint_round_trip(tmp_path):
    model = _model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    ckpt.save_checkpoint(tmp_path, "latest", model, 7, {"optimizer": optimizer.state_dict()}, info={"score": 0.5})

    restored = _model(1)
    pointer = ckpt.load_weights(restored, tmp_path, "latest")
    assert pointer["step"] == 7
    assert pointer["score"] == 0.5
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    state = ckpt.load_training_state(tmp_path, "latest")
    assert state["step"] == 7
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_new_save_replaces_old_files(tmp_path):
    model = _model(0)
    ckpt.save_checkpoint(tmp_path, "latest", model, 2, {})
    (tmp_path / "checkpoints" / "latest-0000003.pt").write_bytes(b"left by a killed save")
    ckpt.save_checkpoint(tmp_path, "latest", model, 4, {})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest-0000004.pt", "latest-0000004.safetensors", "latest.json"]


def test_checkpoint_failed_save_keeps_previous(tmp_path, monkeypatch):
    model = _model(0)
    ckpt.save_checkpoint(tmp_path, "latest", model, 2, {"marker": "old"})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, "latest", _model(5), 4, {"marker": "new"})
    monkeypatch.undo()
    assert ckpt.read_pointer(tmp_path, "latest")["step"] == 2
    assert ckpt.load_training_state(tmp_path, "latest")["marker"] == "old"
    restored = _model(9)
    ckpt.load_weights(restored, tmp_path, "latest")
    assert torch.equal(restored[0].weight, model[0].weight)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.suffix == ".tmp"]


def test_checkpoint_best_falls_back_to_latest(tmp_path):
    ckpt.save_checkpoint(tmp_path, "latest", _model(0), 3, {})
    assert ckpt.load_weights(_model(1), tmp_path, "best")["kind"] == "latest"


def test_checkpoint_missing_is_clear_error(tmp_path):
    assert ckpt.read_pointer(tmp_path, "latest") is None
    assert ckpt.load_training_state(tmp_path) is None
    with pytest.raises(TrainingError, match="no checkpoint found; train the run first"):
        ckpt.load_weights(_model(0), tmp_path)


def test_checkpoint_wrong_model_is_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path, "latest", _model(0), 1, {})
    with pytest.raises(TrainingError, match="do not fit the model"):
        ckpt.load_weights(nn.Linear(3, 4), tmp_path, "latest")


def test_checkpoint_corrupt_pointer(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "latest.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TrainingError, match="cannot read the checkpoint pointer: .*; delete it to start over"):
        ckpt.read_pointer(tmp_path, "latest")
    (folder / "latest.json").write_text("[]", encoding="utf-8")
    with pytest.raises(TrainingError, match="lacks 'step'"):
        ckpt.read_pointer(tmp_path, "latest")
    (folder / "latest.json").write_text(json.dumps({"step": 1}), encoding="utf-8")
    with pytest.raises(TrainingError, match="lacks 'weights'"):
        ckpt.read_pointer(tmp_path, "latest")


def test_rng_state_restores_every_generator():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = ckpt.capture_rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(), torch.rand(())
    ckpt.restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
