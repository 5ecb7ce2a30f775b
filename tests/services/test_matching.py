"""Calibration: one class writes and reads resources/calibration.json (tools.eval_lfw --calibrate writes it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from api.config import REPO_ROOT
from api.services.matching import Calibration


def test_the_shipped_calibration_round_trips_byte_for_byte(tmp_path: Path) -> None:
    shipped = REPO_ROOT / "resources" / "calibration.json"
    for calibration in Calibration.load_all(shipped):
        calibration.save(tmp_path / "calibration.json")
    assert (tmp_path / "calibration.json").read_bytes() == shipped.read_bytes()


def test_each_model_has_its_entry_and_saving_one_keeps_the_others(tmp_path: Path) -> None:
    fmr = np.array([1e-4, 1e-3, 1e-2])
    rng = np.random.default_rng(1)
    first = Calibration.from_impostor_scores("first", rng.uniform(0.5, 0.9, 10_000), fmr)
    second = Calibration.from_impostor_scores("second", rng.uniform(0.6, 1.0, 10_000), fmr)
    path = tmp_path / "calibration.json"
    first.save(path)
    second.save(path)
    assert [c.model_id for c in Calibration.load_all(path)] == ["first", "second"]
    assert Calibration.load(path, "second").compare_threshold == pytest.approx(second.compare_threshold, abs=1e-6)
    assert Calibration.load(path, "unknown").model_id == "first"  # the service warns about the mismatch
    again = Calibration.from_impostor_scores("first", rng.uniform(0.1, 0.2, 10_000), fmr)
    again.save(path)  # recalibrating one model replaces its entry in place
    assert [c.model_id for c in Calibration.load_all(path)] == ["first", "second"]
    assert Calibration.load(path, "first").compare_threshold < 0.21


def test_a_file_of_the_first_format_still_loads(tmp_path: Path) -> None:
    calibration = Calibration.from_impostor_scores("m", np.linspace(0.5, 1.0, 1000), np.array([1e-2, 1e-1]))
    path = tmp_path / "old.json"
    path.write_text(json.dumps(calibration._entry()))  # one model at the top level, as before
    assert Calibration.load(path).model_id == "m" and Calibration.load(path, "m").compare_fmr == calibration.compare_fmr


def test_thresholds_from_impostor_scores(tmp_path: Path) -> None:
    scores = np.random.default_rng(0).uniform(0.5, 1.0, 200_000)
    fmr = np.array([1e-4, 1e-3, 1e-2])
    calibration = Calibration.from_impostor_scores("m", scores, fmr, source="test")
    for rate in fmr:  # the threshold at each FMR lets that fraction of impostors through
        assert np.mean(scores >= calibration.threshold_at_fmr(rate)) <= rate * 1.2 + 1e-5
    assert calibration.identify_threshold(100) >= calibration.identify_threshold(1) >= calibration.compare_threshold
    calibration.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert again.model_id == "m" and np.allclose(again.similarity, calibration.similarity, atol=1e-6)
