"""The training examples run against a live server and actually learn."""

from __future__ import annotations

import importlib.util
from itertools import pairwise
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlp_learns_the_spirals(server_address, capsys):
    history = _load("train_mlp").train(server_address, steps=150, report_every=25)
    first_loss, last_loss = history[0][1], history[-1][1]
    assert last_loss < 0.5 * first_loss
    assert all(later[1] < earlier[1] for earlier, later in pairwise(history))
    # Three classes: chance is 1/3.
    assert history[-1][2] > 0.9
    assert "accuracy" in capsys.readouterr().out


def test_cnn_learns_the_bars(server_address, capsys):
    history = _load("train_cnn").train(server_address, steps=30, report_every=5)
    first_loss, last_loss = history[0][1], history[-1][1]
    assert last_loss < 0.5 * first_loss
    assert history[-1][2] > 0.9
    assert "loss" in capsys.readouterr().out
