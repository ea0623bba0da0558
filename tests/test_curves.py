"""``frugalseg curve``: validation points against training minutes, the stages a run started from included."""

import json

import pytest
from typer.testing import CliRunner

from frugalseg.cli import app
from frugalseg.curves import validation_points


def _run(folder, entries, init=None, seconds=0.0):
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (folder / "run.json").write_text(json.dumps({"init": init, "train_seconds": seconds}))
    (folder / "model.pt").write_bytes(b"")
    return folder


def test_points_count_the_time_of_the_stages_before(tmp_path):
    first = _run(tmp_path / "a", [{"step": 10, "loss": 1.0, "seconds": 60.0}, {"step": 10, "val_dice": 0.3},
                                  {"step": 20, "loss": 0.5, "seconds": 120.0}, {"step": 20, "val_dice": 0.4}],
                 seconds=120.0)
    second = _run(tmp_path / "b", [{"step": 5, "loss": 0.4, "seconds": 30.0},
                                   {"step": 10, "loss": 0.3, "seconds": 60.0}, {"step": 10, "val_dice": 0.6}],
                  init=str(first / "model.pt"), seconds=60.0)
    assert validation_points(second) == [(1.0, 0.3), (2.0, 0.4), (3.0, 0.6)]
    assert validation_points(second, include_earlier=False) == [(1.0, 0.6)]
    out = tmp_path / "c.png"
    result = CliRunner().invoke(app, ["curve", str(first), str(second), "--labels", "one,two", "--out", str(out)])
    assert result.exit_code == 0 and out.stat().st_size > 0, result.output
    assert "two: 1.0 min 0.300, 2.0 min 0.400, 3.0 min 0.600" in result.output
    again = CliRunner().invoke(app, ["curve", str(first), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_a_run_without_validation_is_one_line(tmp_path):
    from frugalseg.errors import UserError

    plain = _run(tmp_path / "a", [{"step": 10, "loss": 1.0, "seconds": 60.0}])
    with pytest.raises(UserError, match="no validation along the way"):
        validation_points(plain)
