"""The LFW evaluation's metrics: TAR at a false-match rate over all pairs, TPIR at an FPIR (1:N)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tools.eval_lfw import AllPairs, tar_at_fmr, tpir_at_fpir


def test_tar_at_fmr_counts_genuine_scores_above_the_impostor_quantile() -> None:
    impostor = np.linspace(0.0, 1.0, 10_001)  # 1e-3 of them lie above 0.999
    genuine = np.array([0.5, 0.9985, 0.9995, 1.0])
    assert tar_at_fmr(genuine, impostor, 1e-3) == pytest.approx(0.5)
    assert tar_at_fmr(genuine, impostor, 0.5) == pytest.approx(0.75)


def test_all_pairs_split_same_person_and_cross_person_pairs() -> None:
    paths = [Path(f"/lfw/{name}/{name}_{i}.jpg") for name, i in (("a", 1), ("a", 2), ("b", 1), ("c", 1))]
    vectors = {p: np.eye(4, dtype=np.float32)[i] for i, p in enumerate(paths)}
    vectors[paths[3]] = None  # no face: left out of every pair
    pairs = AllPairs(paths, vectors)
    metrics = pairs.metrics()
    assert metrics["genuine_comparisons"] == 1 and metrics["impostor_comparisons"] == 2


def test_tpir_at_fpir_reads_the_threshold_off_the_strangers() -> None:
    genuine = [(0, 0.9), (1, 0.8), (2, 0.95), (9, 0.99), None]  # the 4th finds the wrong user, the 5th no face
    strangers = [(0, s) for s in np.linspace(0.1, 0.85, 100)]  # the best stranger scores 0.85
    threshold, tpir, fpir = tpir_at_fpir(genuine, strangers, 0.01)
    assert fpir <= 0.01 and 0.84 < threshold <= 0.85
    assert tpir == pytest.approx(2 / 5)  # 0.9 and 0.95: right user above the threshold
