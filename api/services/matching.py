"""Similarity scores and calibrated thresholds (the 1:N search itself is the store's: ``api.store``).

Descriptors are unit vectors. ``distance`` is their Euclidean distance (0..2) and ``similarity`` is
``1 - distance**2 / 4`` = ``(1 + cosine) / 2``: in [0, 1], higher = more alike, a monotone function of
distance. Thresholds are in similarity units.

1:1 and 1:N need different thresholds: an impostor probe is compared with every enrolled user, so the
chance that it matches *someone* grows with the gallery (FPIR ~ N x FMR). The identification threshold
is therefore the similarity whose per-comparison false-match rate is ``target_fpir / N``, read from the
impostor score distribution measured on LFW pairsDevTrain (``resources/calibration.json``, one entry per
embedding model, written by ``python -m tools.eval_lfw --calibrate``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def similarity_from_cosine(cosine: np.ndarray | float) -> np.ndarray | float:
    return (1.0 + np.clip(cosine, -1.0, 1.0)) / 2.0


def distance_from_similarity(similarity: np.ndarray | float) -> np.ndarray | float:
    return np.sqrt(np.clip(4.0 * (1.0 - np.asarray(similarity)), 0.0, 4.0))


@dataclass(frozen=True)
class Calibration:
    """The impostor similarity at each false-match rate, and the targets the defaults follow."""

    model_id: str
    fmr: np.ndarray  # ascending, e.g. 1e-6 .. 1e-1
    similarity: np.ndarray  # same length: similarity exceeded by that fraction of impostor comparisons
    compare_fmr: float = 1e-3
    identify_fpir: float = 0.01
    source: str = ""

    @classmethod
    def load(cls, path: Path, model_id: str | None = None) -> Calibration:
        """The entry of ``model_id`` in the file; the file's first entry when it has none for that model (the
        service then warns that its thresholds were calibrated for another model) or when no id is given."""
        entries = cls.load_all(path)
        return next((entry for entry in entries if entry.model_id == model_id), entries[0])

    @classmethod
    def load_all(cls, path: Path) -> list[Calibration]:
        """Every model's entry, in file order. A file of the first format holds one model at its top level."""
        data = json.loads(Path(path).read_text())
        entries = data.get("models", [data])
        if not entries:
            raise ValueError(f"{path} holds no calibrated model")
        return [cls._from_entry(entry) for entry in entries]

    @classmethod
    def _from_entry(cls, data: dict) -> Calibration:
        table = data["impostor_tail"]
        return cls(
            model_id=data["model_id"],
            fmr=np.asarray(table["fmr"], np.float64),
            similarity=np.asarray(table["similarity"], np.float64),
            compare_fmr=float(data["compare_fmr"]),
            identify_fpir=float(data["identify_fpir"]),
            source=data.get("source", ""),
        )

    @classmethod
    def from_impostor_scores(
        cls,
        model_id: str,
        impostor_similarity: np.ndarray,
        fmr: np.ndarray,
        *,
        source: str = "",
        compare_fmr: float = 1e-3,
        identify_fpir: float = 0.01,
    ) -> Calibration:
        """The table measured on these impostor comparisons: at each false-match rate in ``fmr`` (ascending),
        the similarity that this fraction of the comparisons reaches."""
        ranked = np.sort(np.asarray(impostor_similarity, np.float64).ravel())[::-1]
        if ranked.size == 0:
            raise ValueError("no impostor comparisons to calibrate on")
        rates = np.asarray(fmr, np.float64)
        similarity = np.array([ranked[min(int(rate * ranked.size), ranked.size - 1)] for rate in rates])
        return cls(model_id, rates, similarity, compare_fmr, identify_fpir, source)

    def save(self, path: Path) -> None:
        """Write this model's entry into the JSON that :meth:`load` reads (similarities to 6 decimals): the
        file's entry of the same model is replaced in place, other models' entries are kept."""
        target = Path(path)
        entries = self.load_all(target) if target.exists() else []
        position = next((i for i, entry in enumerate(entries) if entry.model_id == self.model_id), len(entries))
        entries[position : position + 1] = [self]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"models": [entry._entry() for entry in entries]}, indent=2) + "\n")

    def _entry(self) -> dict:
        return {
            "model_id": self.model_id,
            "source": self.source,
            "compare_fmr": float(self.compare_fmr),
            "identify_fpir": float(self.identify_fpir),
            "impostor_tail": {
                "fmr": [float(f) for f in self.fmr],
                "similarity": [round(float(s), 6) for s in self.similarity],
            },
        }

    def threshold_at_fmr(self, fmr: float) -> float:
        """Similarity threshold whose false-match rate per comparison is ``fmr`` (log-interpolated)."""
        log_fmr = np.log10(np.clip(fmr, self.fmr[0], self.fmr[-1]))
        # similarity falls as FMR rises: interpolate on ascending log FMR.
        return float(np.interp(log_fmr, np.log10(self.fmr), self.similarity))

    @property
    def compare_threshold(self) -> float:
        return self.threshold_at_fmr(self.compare_fmr)

    def identify_threshold(self, gallery_users: int) -> float:
        """Stricter as the gallery grows, never looser than the 1:1 threshold."""
        per_comparison = self.identify_fpir / max(gallery_users, 1)
        return max(self.threshold_at_fmr(per_comparison), self.compare_threshold)
