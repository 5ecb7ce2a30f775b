"""Choose FaceNet's crop and the fused descriptor's weights on LFW pairsDevTrain, never on test data.

Every image of pairsDevTrain is detected once with the service's detector (the central face, as the LFW
evaluation picks it). Then:

1. **FaceNet's crop.** Each candidate (box crops with a margin, landmark alignments on dlib's template at
   several zooms) is embedded by our Keras FaceNet, with and without flip averaging for the best crops.
2. **The fusion weight.** For ``w`` in 0, 0.05, ..., 1 the fused cosine is ``w cos_dlib + (1 - w)
   cos_facenet``: the inner product of ``[sqrt(w) dlib, sqrt(1 - w) facenet]``.

The criterion is TAR at FMR 1e-3 over every pair of the train images (all same-person pairs against all
cross-person pairs, about 5.8 million impostor comparisons), with TAR at FMR 1e-4 and the pairsDevTrain
accuracy at its best threshold beside it. The choices are written to ``reports/fusion/tuning.json`` and
printed; the service reads them from ``api.services.alignment.FACENET_CROP`` and
``api.services.embedding.FUSED_DLIB_WEIGHT``, where the chosen values are copied by hand.

Example::

    python -m tools.tune_fusion
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from api.config import Settings
from api.errors import FaceServiceError
from api.services.alignment import SimilarityAligner, facenet_aligner
from api.services.detection import DetectedFace
from api.services.embedding import KerasFacenetEmbedder
from api.services.engine import build_engine
from api.services.imaging import decode_image
from tools.common import LFW, REPO_ROOT, read_pairs
from tools.eval_lfw import AllPairs, accuracy_at, best_threshold, pair_scores

CANDIDATES: dict[str, dict[str, float | str]] = {
    "box m-0.1": {"kind": "box", "margin": -0.1, "shift_y": 0.0},
    "box m0.0": {"kind": "box", "margin": 0.0, "shift_y": 0.0},
    "box m0.1": {"kind": "box", "margin": 0.1, "shift_y": 0.0},
    "box m0.2": {"kind": "box", "margin": 0.2, "shift_y": 0.0},
    "box m0.3": {"kind": "box", "margin": 0.3, "shift_y": 0.0},
    "box m0.45": {"kind": "box", "margin": 0.45, "shift_y": 0.0},
    "box m0.6": {"kind": "box", "margin": 0.6, "shift_y": 0.0},
    "box m0.1 up0.05": {"kind": "box", "margin": 0.1, "shift_y": -0.05},
    "box m0.1 down0.05": {"kind": "box", "margin": 0.1, "shift_y": 0.05},
    "box m0.3 down0.05": {"kind": "box", "margin": 0.3, "shift_y": 0.05},
    "landmarks x1.0": {"kind": "landmarks", "scale": 1.0, "shift_y": 0.0},
    "landmarks x0.85": {"kind": "landmarks", "scale": 0.85, "shift_y": 0.0},
    "landmarks x0.7": {"kind": "landmarks", "scale": 0.7, "shift_y": 0.0},
}
# Coarse over the whole range, fine near 1: dlib's cosines spread far less than FaceNet's, so its share of the
# sum must be large for both to count alike.
WEIGHTS = np.unique(np.round(np.concatenate([np.linspace(0.0, 1.0, 21), np.linspace(0.8, 0.99, 20)]), 2))


def detect_all(paths: list[Path]) -> tuple[list[np.ndarray], list[DetectedFace], list[Path], np.ndarray, Settings]:
    """Decoded images, their subject's face (central rule) and its dlib descriptor (with flip, as the service
    computes it); images without a usable face are left out."""
    settings = Settings(embedder="dlib-resnet")
    engine = build_engine(settings)
    images, faces, kept = [], [], []
    for path in paths:
        image = decode_image(path.read_bytes())
        try:
            face = engine.select_face(image, engine.detect(image), "central")
        except FaceServiceError:
            continue
        images.append(image)
        faces.append(face)
        kept.append(path)
    dlib = np.concatenate(
        [engine.embed_chips(np.stack([engine.align(i, [f])[0] for i, f in batch])) for batch in _batches(images, faces)]
    )
    return images, faces, kept, dlib, settings


def _batches(images: list[np.ndarray], faces: list[DetectedFace], size: int = 32) -> list[list[tuple]]:
    pairs = list(zip(images, faces, strict=True))
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


def short(metrics: dict[str, float]) -> dict[str, float]:
    return {
        "tar_at_fmr_1e-3": metrics["all_pairs_tar_at_fmr_1e-3"],
        "tar_at_fmr_1e-4": metrics["all_pairs_tar_at_fmr_1e-4"],
    }


def embed_with(
    embedder: KerasFacenetEmbedder, aligner: SimilarityAligner, images: list[np.ndarray], faces: list[DetectedFace]
) -> np.ndarray:
    return np.concatenate(
        [embedder.embed(np.stack([aligner.align(i, f) for i, f in batch])) for batch in _batches(images, faces)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=LFW / "images")
    parser.add_argument("--train-pairs", type=Path, default=LFW / "pairsDevTrain.txt")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "fusion")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--flip-best", type=int, default=2, help="the best crops measured again with flip")
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"No images at {args.images}: the LFW data lives in ../shared/facedata (see README).")
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = read_pairs(args.train_pairs, args.images)
    paths = sorted({p for pair in pairs for p in (pair.first, pair.second)})
    started = time.perf_counter()
    images, faces, kept, dlib, settings = detect_all(paths)
    print(f"{len(kept)} of {len(paths)} pairsDevTrain images with a face, {time.perf_counter() - started:.0f} s")
    index = {p: i for i, p in enumerate(kept)}
    masks = AllPairs(kept, {p: dlib[i] for p, i in index.items()})

    def pair_accuracy(vectors: np.ndarray) -> float:
        by_path = {p: vectors[i] for p, i in index.items()}
        scores, same = pair_scores(pairs, {p: by_path.get(p) for p in paths})
        return accuracy_at(scores, same, best_threshold(scores, same))

    def row(name: str, vectors: np.ndarray, **extra: object) -> dict:
        result = {
            "name": name,
            **extra,
            **short(masks.metrics(vectors @ vectors.T)),
            "pair_accuracy": pair_accuracy(vectors),
        }
        print(json.dumps(result), flush=True)
        return result

    rows = [row("dlib-resnet (flip)", dlib)]
    crops: list[dict] = []
    embedders = {flip: KerasFacenetEmbedder(settings.facenet_model_path, flip=flip) for flip in (False, True)}
    vectors_of: dict[tuple[str, bool], np.ndarray] = {}
    for name in args.candidates:
        vectors_of[(name, False)] = embed_with(embedders[False], facenet_aligner(CANDIDATES[name]), images, faces)
        crops.append(row(f"facenet, {name}", vectors_of[(name, False)], crop=name, flip=False))
    ranked = sorted(crops, key=lambda r: (r["tar_at_fmr_1e-3"], r["tar_at_fmr_1e-4"]), reverse=True)
    for best in ranked[: args.flip_best]:
        name = best["crop"]
        vectors_of[(name, True)] = embed_with(embedders[True], facenet_aligner(CANDIDATES[name]), images, faces)
        crops.append(row(f"facenet, {name}, flip", vectors_of[(name, True)], crop=name, flip=True))
    chosen = max(crops, key=lambda r: (r["tar_at_fmr_1e-3"], r["tar_at_fmr_1e-4"]))
    facenet = vectors_of[(chosen["crop"], chosen["flip"])]
    rows += crops

    fusion = []
    dlib_cos, facenet_cos = dlib @ dlib.T, facenet @ facenet.T
    for weight in WEIGHTS:
        fused = np.concatenate([np.sqrt(weight) * dlib, np.sqrt(1.0 - weight) * facenet], axis=1)
        metrics = short(masks.metrics(weight * dlib_cos + (1.0 - weight) * facenet_cos))
        entry = {"dlib_weight": float(weight), **metrics, "pair_accuracy": pair_accuracy(fused)}
        fusion.append(entry)
        print(json.dumps(entry), flush=True)
    best_fusion = max(fusion, key=lambda r: (r["tar_at_fmr_1e-3"], r["tar_at_fmr_1e-4"], -abs(r["dlib_weight"] - 0.5)))
    result = {
        "command": "python -m tools.tune_fusion",
        "data": f"{len(kept)} pairsDevTrain images ({len(paths) - len(kept)} without a usable face)",
        "genuine_comparisons": int(masks.genuine.sum()),
        "impostor_comparisons": int(masks.impostor.sum()),
        "facenet_crop": {"name": chosen["crop"], **CANDIDATES[chosen["crop"]], "flip": chosen["flip"]},
        "dlib_weight": best_fusion["dlib_weight"],
        "rows": rows,
        "fusion": fusion,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "tuning.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| descriptor | TAR@FMR 1e-3 | TAR@FMR 1e-4 | pairsDevTrain accuracy |",
        "|---|---|---|---|",
        *(
            f"| {r['name']} | {r['tar_at_fmr_1e-3']:.2%} | {r['tar_at_fmr_1e-4']:.2%} | {r['pair_accuracy']:.2%} |"
            for r in rows
        ),
        "",
        "| dlib weight w | TAR@FMR 1e-3 | TAR@FMR 1e-4 | pairsDevTrain accuracy |",
        "|---|---|---|---|",
        *(
            f"| {r['dlib_weight']:.2f} | {r['tar_at_fmr_1e-3']:.2%} | {r['tar_at_fmr_1e-4']:.2%} | "
            f"{r['pair_accuracy']:.2%} |"
            for r in fusion
        ),
    ]
    (args.out / "tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"chosen: FaceNet crop {result['facenet_crop']}, dlib weight {result['dlib_weight']:.2f}")


if __name__ == "__main__":
    main()
