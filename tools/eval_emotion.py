"""Evaluate the emotion classifiers (ours, fer's mini-Xception, deepface) side by side.

Sources are folders laid out as ``<label>/<image>``, a zip with a split prefix (``archive.zip:publictest``),
or photo folders whose file names carry the label (``happy.jpg``, ``test_surprised_cropped.jpg``). 48x48
images are fed as the face itself (FER2013: too small for a detector); larger images go through YuNet and
``crop_face_for_emotion`` (largest face). Without sources, the standard suite from ``../shared`` runs: the
FER2013 PrivateTest half, face-api.js' posed photos and the robustness photos whose manifest row has an
emotion label.

Writes ``report.md``, ``results.json`` and one confusion-matrix PNG per (set, model) to ``--out``.

    python -m tools.eval_emotion                                   # the standard suite, all models
    python -m tools.eval_emotion ../shared/facedata/emotion/fer2013_train_publictest.zip:publictest
    python -m tools.eval_emotion --latency                         # per-face inference time
    python -m tools.eval_emotion --measure-template                # FER2013 landmark template
    python -m tools.eval_emotion --crop-sweep 0.9,1.0,1.1,1.2,1.3  # choose the crop margin
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from api.services.emotion import (
    DEFAULT_BOX_MARGIN,
    DEFAULT_CROP_MARGIN,
    EMOTION_LABELS,
    FACE_SIZE,
    EmotionClassifier,
    build_emotion_classifier,
    crop_face_for_emotion,
)
from tools.common import REPO_ROOT
from tools.datasets import (
    FER2013_PRIVATETEST,
    FER2013_ZIP,
    EvalSet,
    Sample,
    emotion_suite,
    fer2013_arrays,
    fer2013_split,
    load_emotion_set,
)


# ------------------------------------------------------------------------------------------ inference
class FacePreparer:
    """48x48 faces for a set: as given, or detected (largest face) and cropped. ``None`` = no face."""

    def __init__(self, margin: float | None) -> None:
        self.margin = margin
        self._detector = None

    def detector(self) -> object:
        if self._detector is None:
            from api.services.detection import YuNetDetector

            self._detector = YuNetDetector()
        return self._detector

    def __call__(self, sample: Sample) -> np.ndarray | None:
        if sample.face is not None:
            return sample.face
        faces = self.detector().detect(sample.photo)  # type: ignore[attr-defined]
        if not faces:
            return None
        return crop_face_for_emotion(sample.photo, faces[0].box, faces[0].landmarks, self.margin)


def predict_set(classifier: EmotionClassifier, faces: list[np.ndarray | None], batch_size: int = 256) -> np.ndarray:
    """(N, 7) probabilities; rows of images without a detected face are all zero (counted as wrong)."""
    out = np.zeros((len(faces), len(EMOTION_LABELS)))
    present = [i for i, face in enumerate(faces) if face is not None]
    for start in range(0, len(present), batch_size):
        chunk = present[start : start + batch_size]
        out[chunk] = classifier.predict(np.stack([faces[i] for i in chunk]))
    return out


def metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    found = probabilities.sum(axis=1) > 0
    predicted = np.where(found, probabilities.argmax(axis=1), -1)
    confusion = np.zeros((len(EMOTION_LABELS), len(EMOTION_LABELS)), dtype=int)
    for truth, guess in zip(labels, predicted, strict=True):
        if guess >= 0:
            confusion[truth, guess] += 1
    recall = {
        label: (float((predicted[labels == i] == i).mean()) if (labels == i).any() else None)
        for i, label in enumerate(EMOTION_LABELS)
    }
    true_probability = probabilities[np.arange(len(labels)), labels]
    return {
        "n": len(labels),
        "no_face": int((~found).sum()),
        "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
        "mean_true_probability": float(true_probability.mean()) if len(labels) else float("nan"),
        "recall": recall,
        "confusion": confusion.tolist(),
        "predicted": [EMOTION_LABELS[p] if p >= 0 else None for p in predicted.tolist()],
    }


def service_tta() -> str:
    """The test-time views the service uses for ``ours`` (``FACE_EMOTION_TTA`` or its default)."""
    from api.config import Settings

    return Settings().emotion_tta


def load_classifiers(
    names: list[str], ttas: list[str] | None = None
) -> tuple[dict[str, EmotionClassifier], dict[str, str]]:
    """By name; ``ours`` once per test-time mode in ``ttas`` (named ``ours (<mode>)`` when there are several)."""
    from api.errors import ModelUnavailableError

    ttas = ttas or [service_tta()]
    classifiers: dict[str, EmotionClassifier] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        variants = [(name, "")]
        if name == "ours":
            variants = [(f"{name} ({tta})" if len(ttas) > 1 else name, tta) for tta in ttas]
        for label, tta in variants:
            try:
                classifiers[label] = build_emotion_classifier(name, REPO_ROOT / "resources", tta or "flip")
            except ModelUnavailableError as error:
                unavailable[label] = error.message
    return classifiers, unavailable


def ours_description(classifiers: dict[str, EmotionClassifier]) -> str:
    """How our model ran: its test-time views and precision, e.g. "flip views, float32"."""
    ours = [c for name, c in classifiers.items() if name.startswith("ours")]
    if not ours:
        return "-"
    views = "/".join(getattr(c, "tta", "?") for c in ours)
    return f"{views} views, {getattr(ours[0], 'precision', 'float32')}"


def _ttas(args: argparse.Namespace) -> list[str] | None:
    return [mode.strip() for mode in args.tta.split(",") if mode.strip()] or None


# -------------------------------------------------------------------------------------------- reports
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def confusion_png(confusion: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    figure, axes = plt.subplots(figsize=(6.4, 5.6))
    axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), count in np.ndenumerate(confusion):
        axes.text(j, i, str(count), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    axes.set_xticks(range(len(EMOTION_LABELS)), EMOTION_LABELS, rotation=45, ha="right")
    axes.set_yticks(range(len(EMOTION_LABELS)), EMOTION_LABELS)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true (colour: share of the row)")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def confusion_markdown(confusion: list[list[int]]) -> str:
    lines = [
        "| true \\ predicted | " + " | ".join(EMOTION_LABELS) + " |",
        "|---" * (len(EMOTION_LABELS) + 1) + "|",
    ]
    for label, row in zip(EMOTION_LABELS, confusion, strict=True):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def run_suite(args: argparse.Namespace) -> int:
    sets = [load_emotion_set(spec) for spec in args.sources] if args.sources else emotion_suite()
    classifiers, unavailable = load_classifiers(args.models.split(","), _ttas(args))
    prepare = FacePreparer(args.margin)
    margin_text = (
        f"{args.margin}"
        if args.margin is not None
        else f"{DEFAULT_CROP_MARGIN} with landmarks, {DEFAULT_BOX_MARGIN} box only: the service's defaults"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, object]] = {}
    lines = [
        "# Emotion evaluation",
        "",
        f"Command: `python -m tools.eval_emotion {' '.join(sys.argv[1:])}`. Faces of 48x48 images are the "
        f"image itself; photos go through YuNet (largest face) and `crop_face_for_emotion` (margin "
        f"{margin_text}). `ours` averages each face over its test-time views ({ours_description(classifiers)}: "
        "see `tta_views`); the baselines run as their packages do. A photo without a detected face counts as "
        "wrong.",
        "",
    ]
    for name, reason in unavailable.items():
        lines.append(f"* `{name}` unavailable: {reason}")
    lines.append("")
    summary: list[str] = []  # the tables again, for the model card
    for eval_set in sets:
        labels = np.array([s.label for s in eval_set.samples], dtype=int)
        faces = [prepare(sample) for sample in eval_set.samples]
        set_results: dict[str, object] = {}
        lines += [f"## {eval_set.name} ({len(labels)} images)", ""]
        header = "| model | accuracy | mean p(true) | no face | " + " | ".join(EMOTION_LABELS) + " |"
        table = [header, "|---" * (4 + len(EMOTION_LABELS)) + "|"]
        confusions = []
        for model_name, classifier in classifiers.items():
            result = metrics(predict_set(classifier, faces), labels)
            set_results[model_name] = result
            recall = " | ".join(
                "-" if result["recall"][label] is None else f"{result['recall'][label]:.3f}"  # type: ignore[index]
                for label in EMOTION_LABELS
            )
            table.append(
                f"| {model_name} | {result['accuracy']:.4f} | {result['mean_true_probability']:.3f} "
                f"| {result['no_face']} | {recall} |"
            )
            png = args.out / f"confusion_{slug(eval_set.name)}_{slug(model_name)}.png"
            confusion_png(np.array(result["confusion"]), f"{eval_set.name}: {model_name}", png)
            confusions.append(
                f"**{model_name}** ([PNG]({png.name}))\n\n{confusion_markdown(result['confusion'])}"  # type: ignore[arg-type]
            )
        lines += [*table, "", "Recall per class in the label columns.", ""]
        summary += [f"**{eval_set.name}** ({len(labels)} images; recall per class in the label columns)", ""]
        summary += [*table, ""]
        if len(labels) <= 20:  # small photo sets: show each image's prediction
            per_image = [
                "| image | true | " + " | ".join(classifiers) + " |",
                "|---" * (2 + len(classifiers)) + "|",
            ]
            for index, sample in enumerate(eval_set.samples):
                guesses = " | ".join(
                    str(set_results[m]["predicted"][index])
                    for m in classifiers  # type: ignore[index]
                )
                per_image.append(f"| {sample.name} | {EMOTION_LABELS[sample.label]} | {guesses} |")
            lines += [*per_image, ""]
            summary += [*per_image, ""]
        lines += ["<details><summary>Confusion matrices</summary>", "", *confusions, "", "</details>", ""]
        results[eval_set.name] = set_results
        print(eval_set.name, {m: round(r["accuracy"], 4) for m, r in set_results.items()}, flush=True)  # type: ignore[index]
    (args.out / "report.md").write_text("\n".join(lines))
    payload = {"results": results, "unavailable": unavailable, "margin": margin_text}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out / 'report.md'}")
    if args.update_card:
        body = [
            f"`python -m tools.eval_emotion {' '.join(sys.argv[1:])}` (full report, confusion matrices as",
            "markdown and PNG: `reports/emotion/`). FER2013 faces are fed as they are; photos go through YuNet",
            f"and `crop_face_for_emotion` (margin {margin_text}); `ours` averaged over its test-time views "
            f"({ours_description(classifiers)}); the baselines as their packages run them.",
            *[f"`{name}` unavailable here: {reason}" for name, reason in unavailable.items()],
            "",
            *summary,
        ]
        replace_card_section(args.update_card, "Comparison with the baselines", body)
    return 0


# --------------------------------------------------------------------------------------- measurements
def _publictest(args: argparse.Namespace) -> EvalSet:
    return fer2013_split(args.fer_zip, "publictest")


def measure_template(args: argparse.Namespace) -> int:
    """Mean YuNet landmarks and median box over the FER2013 PublicTest faces, in 48x48 pixels."""
    from api.services.detection import YuNetDetector

    detector = YuNetDetector()  # upscales the 48 px images to 300 px itself (min_side) and maps back
    points, boxes = [], []
    samples = _publictest(args).samples
    for sample in samples:
        faces = detector.detect(cv2.cvtColor(sample.face, cv2.COLOR_GRAY2RGB))
        if faces:
            points.append(faces[0].landmarks)
            boxes.append(faces[0].box)
    pts, box = np.array(points, dtype=np.float64), np.array(boxes, dtype=np.float64)
    mean = pts.mean(axis=0)
    # Left-right symmetric: average each point with its mirror partner about the mean of the x coordinates.
    axis = mean[:, 0].mean()
    mirror = [1, 0, 2, 4, 3]
    symmetric = mean.copy()
    symmetric[:, 0] = (mean[:, 0] + (2 * axis - mean[mirror, 0])) / 2
    symmetric[:, 1] = (mean[:, 1] + mean[mirror, 1]) / 2
    centre = np.median(box[:, :2] + box[:, 2:] / 2, axis=0)
    side = np.median((box[:, 2] + box[:, 3]) / 2)
    print(f"faces found in {len(pts)} of {len(samples)} PublicTest images")
    print("mean landmarks:\n", np.round(mean, 2), "\nstd:\n", np.round(pts.std(axis=0), 2))
    print("symmetric template:\n", np.round(symmetric, 2))
    print(f"box centre (median): {np.round(centre, 2)}  mean side (median): {side:.2f}")
    return 0


def crop_sweep(args: argparse.Namespace) -> int:
    """Accuracy of ``ours`` (and fer) per crop margin, on two kinds of data:

    * PublicTest faces upscaled 4x to 192 px and run through the detector as if they were photos, so the
      crop must rebuild FER2013's own framing (tuning data; PrivateTest is never used here);
    * the labelled full-size photos (face-api.js and robustness), where the face sits in a real scene.
    """
    margins = [float(m) for m in args.crop_sweep.split(",")]
    classifiers, unavailable = load_classifiers(args.models.split(","))
    for name, reason in unavailable.items():
        print(f"{name} unavailable: {reason}")
    public = _publictest(args)
    if args.sweep_limit:
        rng = np.random.default_rng(0)
        keep = sorted(rng.choice(len(public.samples), min(args.sweep_limit, len(public.samples)), replace=False))
        public.samples = [public.samples[i] for i in keep]
    upscaled = [
        Sample(
            s.name,
            s.label,
            photo=cv2.cvtColor(cv2.resize(s.face, (192, 192), interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2RGB),
        )
        for s in public.samples
    ]
    photos = emotion_suite()[1:]
    photo_samples = [s for eval_set in photos for s in eval_set.samples]
    # Detect once per image; only the crop depends on the margin.
    detector = FacePreparer(None).detector()
    detections = {id(s): detector.detect(s.photo) for s in upscaled + photo_samples}  # type: ignore[attr-defined]

    def crops(samples: list[Sample], margin: float, landmarks: bool) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for s in samples:
            faces = detections[id(s)]
            out.append(
                crop_face_for_emotion(s.photo, faces[0].box, faces[0].landmarks if landmarks else None, margin)
                if faces
                else None
            )
        return out

    # Only the PublicTest images in which YuNet finds a face are compared (the misses are the detector's,
    # the same at every margin), against the same images fed directly as 48x48 faces.
    found = [i for i, s in enumerate(upscaled) if detections[id(s)]]
    upscaled = [upscaled[i] for i in found]
    public_labels = np.array([public.samples[i].label for i in found])
    photo_labels = np.array([s.label for s in photo_samples])
    header = (
        "| margin | crop from | "
        + " | ".join(f"{m}: PublicTest x4 acc | {m}: photos acc | {m}: photos mean p(true)" for m in classifiers)
        + " |"
    )
    direct = {
        m: metrics(predict_set(c, [public.samples[i].face for i in found]), public_labels)["accuracy"]
        for m, c in classifiers.items()
    }
    lines = [
        f"PublicTest x4: the {len(public_labels)} of {len(public.samples)} PublicTest images in which YuNet finds a "
        f"face once upscaled 4x to 192 px (cubic), cropped back to 48x48; labelled photos: {len(photo_labels)} "
        f"({', '.join(s.name for s in photo_samples)}).",
        "",
        "Reference, the same PublicTest images fed directly as 48x48: "
        + ", ".join(f"{m} {accuracy:.4f}" for m, accuracy in direct.items()),
        "",
        header,
        "|---|---|" + "---|" * (3 * len(classifiers)),
    ]
    first = next(iter(classifiers))
    scored: dict[tuple[bool, float], tuple[float, float]] = {}  # first model: PublicTest acc, photo p(true)
    for landmarks in (True, False):
        for margin in margins:
            public_faces = crops(upscaled, margin, landmarks)
            photo_faces = crops(photo_samples, margin, landmarks)
            cells = []
            for name, classifier in classifiers.items():
                pub = metrics(predict_set(classifier, public_faces), public_labels)
                pho = metrics(predict_set(classifier, photo_faces), photo_labels)
                cells.append(f"{pub['accuracy']:.4f} | {pho['accuracy']:.3f} | {pho['mean_true_probability']:.3f}")
                if name == first:
                    scored[(landmarks, margin)] = (pub["accuracy"], pho["mean_true_probability"])  # type: ignore[assignment]
            line = f"| {margin} | {'landmarks' if landmarks else 'box only'} | " + " | ".join(cells) + " |"
            lines.append(line)
            print(line, flush=True)
    # The rule: PublicTest (thousands of faces) decides within its noise; the few real photos break ties.
    for landmarks in (True, False):
        rows = {m: v for (lm, m), v in scored.items() if lm == landmarks}
        best_public = max(v[0] for v in rows.values())
        close = [m for m, v in rows.items() if v[0] >= best_public - 0.005]
        pick = max(close, key=lambda m: rows[m][1])
        lines.append(
            f"\nRule (`{first}`): among margins within 0.5 points of the best PublicTest x4 accuracy, the "
            f"highest mean p(true) on the photos. {'With landmarks' if landmarks else 'Box only'}: "
            f"margin {pick} (PublicTest x4 {rows[pick][0]:.4f}, photos mean p(true) {rows[pick][1]:.3f})."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crop_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.update_card:
        replace_card_section(args.update_card, "Face crop for photos", crop_card_body(lines))
    if args.save_crops:
        # A contact sheet of the photo crops at each margin, to look at what the model sees.
        sheet = [np.hstack([c if c is not None else np.zeros((FACE_SIZE, FACE_SIZE), np.uint8)
                            for c in crops(photo_samples, margin, True)]) for margin in margins]  # fmt: skip
        cv2.imwrite(str(args.out / "crop_sweep_photos.png"), np.vstack(sheet))
    return 0


def replace_card_section(card: Path, heading: str, body: list[str]) -> None:
    """Put ``## heading`` with ``body`` into the model card, replacing an earlier version of that section
    (up to the next ``## `` heading). tools/train_emotion.py keeps these sections when it rewrites the card."""
    text = card.read_text() if card.is_file() else ""
    title = f"## {heading}"
    section = "\n".join([title, "", *body]).rstrip() + "\n"
    if f"\n{title}\n" in text:
        start = text.index(f"\n{title}\n") + 1
        following = text.find("\n## ", start + len(title))
        end = len(text) if following < 0 else following + 1
        text = text[:start] + section + ("\n" + text[end:] if end < len(text) else "")
    else:
        text = text.rstrip() + "\n\n" + section
    card.write_text(text)
    print(f"updated section {title!r} of {card}")


def crop_card_body(table: list[str]) -> list[str]:
    return [
        "`crop_face_for_emotion` maps the detector's five landmarks onto FER2013's mean landmark positions",
        "(`python -m tools.eval_emotion --measure-template`: YuNet on the PublicTest images upscaled to",
        "300 px), levels the eyes, and scales by eye distance plus eye-to-mouth distance. The margin widens",
        "(>1) or narrows (<1) the field of view around that framing. Measured with",
        f"`python -m tools.eval_emotion {' '.join(sys.argv[1:])}`:",
        "",
        *table,
        "",
        f"In use (`api/services/emotion.py`): margin **{DEFAULT_CROP_MARGIN}** for the landmark crop",
        f"(`DEFAULT_CROP_MARGIN`) and **{DEFAULT_BOX_MARGIN}** for the box-only fallback (`DEFAULT_BOX_MARGIN`).",
        "The box-only rows are optimistic on PublicTest x4: the box statistics were measured on those very",
        "images, so there the box crop nearly reproduces the original; on photos the landmark crop also",
        "levels the eyes and is independent of how a detector draws its box.",
    ]


def latency(args: argparse.Namespace) -> int:
    """Median time of ``predict`` for one face (batch of 1), after warm-up, per classifier; and, for ours,
    how far the service's bfloat16 path is from float32 on the PrivateTest half."""
    import os

    classifiers, unavailable = load_classifiers(args.models.split(","), _ttas(args))
    private, private_labels = fer2013_arrays(FER2013_PRIVATETEST)
    lines = [
        f"`python -m tools.eval_emotion {' '.join(sys.argv[1:])}` on this machine ({os.cpu_count()} cores, "
        "other work running beside it): one face per call (batch of 1, the service's case), 50 different "
        "PrivateTest faces in turn, after warm-up.",
        "",
        "| model | median ms / face | p90 ms | calls | batch of 50: ms / face |",
        "|---|---|---|---|---|",
    ]
    note = ""
    ours = {name: c for name, c in classifiers.items() if name.startswith("ours")}
    if ours:
        from api.services.emotion import KerasEmotionClassifier, cpu_has_bf16

        if cpu_has_bf16():
            # The optional bfloat16 path: its speed, and how far it is from the float32 default.
            first_name, first = next(iter(ours.items()))
            tta = getattr(first, "tta", "flip")
            fast = KerasEmotionClassifier(
                REPO_ROOT / "resources" / "emotion_model.keras", precision="bfloat16", tta=tta
            )
            low, exact = fast.predict(private), first.predict(private)
            agreement = float((low.argmax(axis=1) == exact.argmax(axis=1)).mean())
            accuracies = [float((p.argmax(axis=1) == private_labels).mean()) for p in (low, exact)]
            note = (
                f"ours ({tta} views), bfloat16 vs float32 on the {len(private_labels)} PrivateTest-half faces: same "
                f"class for {agreement:.2%}, largest probability difference {np.abs(low - exact).max():.4f}, "
                f"accuracy {accuracies[0]:.4f} vs {accuracies[1]:.4f}."
            )
            print(note)
            classifiers = {
                **{f"{name}, float32": c for name, c in ours.items()},
                f"{first_name}, bfloat16 (optional)": fast,
                **{k: v for k, v in classifiers.items() if k not in ours},
            }
    faces = private[:50]
    for name, classifier in classifiers.items():
        for face in faces[:5]:
            classifier.predict(face[None])
        times = []
        for _ in range(args.latency_runs // len(faces) + 1):
            for face in faces:
                tic = time.perf_counter()
                classifier.predict(face[None])
                times.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        classifier.predict(faces)
        batch = (time.perf_counter() - tic) / len(faces)
        row = (
            f"| {name} | {statistics.median(times) * 1000:.2f} | {np.percentile(times, 90) * 1000:.2f} "
            f"| {len(times)} | {batch * 1000:.2f} |"
        )
        lines.append(row)
        print(row, flush=True)
    for name, reason in unavailable.items():
        lines.append(f"\n`{name}` unavailable: {reason}")
    if ours:
        lines += ["", f"The service's default for `ours`: {service_tta()} views (`FACE_EMOTION_TTA`), float32."]
    if note:
        lines += ["", note]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.md").write_text("\n".join(lines) + "\n")
    if args.update_card:
        replace_card_section(args.update_card, "Inference time", lines)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", help="folders or archive.zip:split; default: the standard suite")
    parser.add_argument("--models", default="ours,fer,deepface")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "emotion")
    parser.add_argument("--margin", type=float, default=None, help="crop margin for photos (default: the service's)")
    parser.add_argument("--fer-zip", type=Path, default=FER2013_ZIP)
    parser.add_argument("--measure-template", action="store_true")
    parser.add_argument("--crop-sweep", default="", help="comma-separated margins to compare")
    parser.add_argument("--sweep-limit", type=int, default=0, help="PublicTest images in the sweep (0: all)")
    parser.add_argument("--save-crops", action="store_true", help="with --crop-sweep: PNG of the photo crops")
    parser.add_argument(
        "--update-card",
        type=Path,
        default=None,
        help="write the results into this model card (suite, --crop-sweep, --latency)",
    )
    parser.add_argument(
        "--tta", default="", help="comma-separated test-time modes of ours (flip, multicrop); default: the service's"
    )
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--latency-runs", type=int, default=300)
    args = parser.parse_args(argv)
    if args.measure_template:
        return measure_template(args)
    if args.crop_sweep:
        return crop_sweep(args)
    if args.latency:
        return latency(args)
    return run_suite(args)


if __name__ == "__main__":
    raise SystemExit(main())
