"""Calibration: one class writes and reads resources/calibration.json (tools.eval_lfw --calibrate writes it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from api.config import REPO_ROOT
from api.services.matching import Calibration


def test_the_shipped_calibration_round_trips_byte_for_byte(tmp_path: Path) -> None:
    shipped = REPO_ROOT / "resources" / "calibration.json"
    calibration = Calibration.load(shipped)
    calibration.save(tmp_path / "calibration.json")
    assert (tmp_path / "calibration.json").read_bytes() == shipped.read_bytes()


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
