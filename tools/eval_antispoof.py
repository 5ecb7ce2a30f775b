"""Evaluate MiniFASNet anti-spoofing on folders of bona fide and attack images (ISO/IEC 30107-3 terms).

For every image: decode it as the service does (EXIF orientation applied), take the largest YuNet face,
score it with ``MiniFASNetAntiSpoofing`` and decide two ways:

* threshold: bona fide iff the averaged "real" probability >= ``--threshold`` (the service's rule);
* argmax: bona fide iff "real" is the largest of the 3 averaged class probabilities (the reference's
  rule, deepface's ``is_real``). The two differ when no class reaches 0.5.

APCER (attack presentations accepted as bona fide) is reported per attack type, BPCER (bona fide
presentations rejected) per bona fide group and pooled. Images without a detected face or that cannot be
decoded are counted per group and left out of the rates. Writes ``report.md``, ``scores.csv`` and
``det.png`` (DET curves, one per attack type against all bona fide images) to ``--out``.

    python -m tools.eval_antispoof --reference                      # the issue's sets from ../shared
    python -m tools.eval_antispoof --bona-fide live/ --attack print=prints/ --attack replay=screens/
    python -m tools.eval_antispoof --reference --latency 200        # also time scoring per face
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from api.errors import FaceServiceError
from api.ml.minifasnet import REAL_CLASS
from api.services.anti_spoofing import MiniFASNetAntiSpoofing
from api.services.detection import YuNetDetector
from api.services.imaging import decode_image
from tools.common import FACEDATA, REPO_ROOT
from tools.datasets import BONA_FIDE, PresentationGroup, antispoof_reference_groups, presentation_groups


@dataclass(frozen=True)
class Scored:
    group: PresentationGroup
    path: Path
    status: str  # "ok", "no face" or "unreadable"
    probs: np.ndarray | None  # averaged softmax of both models
    box: tuple[float, float, float, float] | None


def score_all(
    groups: list[PresentationGroup], detector: YuNetDetector, anti_spoofing: MiniFASNetAntiSpoofing
) -> list[Scored]:
    results = []
    for group in groups:
        for path in group.paths:
            try:
                image = decode_image(path.read_bytes())
            except FaceServiceError:
                results.append(Scored(group, path, "unreadable", None, None))
                continue
            faces = detector.detect(image)
            if not faces:
                results.append(Scored(group, path, "no face", None, None))
                continue
            probs = anti_spoofing.probabilities(image, [faces[0].box])[0]
            results.append(Scored(group, path, "ok", probs, faces[0].box))
        print(f"scored {group.name}: {len(group.paths)} images", flush=True)
    return results


def accepted(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Bona fide decisions for (N, 3) probabilities: by threshold on "real", or by argmax when None."""
    if threshold is None:
        return np.argmax(probs, axis=1) == REAL_CLASS
    return probs[:, REAL_CLASS] >= threshold


def _rate(errors: int, total: int) -> str:
    return f"{100 * errors / total:.1f}% ({errors}/{total})" if total else "n/a"


def summarise(results: list[Scored], threshold: float) -> tuple[list[list[str]], list[list[str]]]:
    """Per-group rows and per-metric rows (APCER per attack type, BPCER pooled) for the report."""
    group_rows, metric_rows = [], []
    groups = list(dict.fromkeys(r.group for r in results))
    for group in groups:
        mine = [r for r in results if r.group == group]
        ok = np.array([r.probs for r in mine if r.probs is not None]).reshape(-1, 3)
        attack = group.label != BONA_FIDE
        row = [
            group.name,
            group.label,
            str(len(mine)),
            str(sum(r.status == "no face" for r in mine)),
            str(sum(r.status == "unreadable" for r in mine)),
        ]
        for rule in (threshold, None):
            decisions = accepted(ok, rule)
            row.append(_rate(int(decisions.sum() if attack else (~decisions).sum()), len(ok)))
        row.append(f"{np.median(ok[:, REAL_CLASS]):.3f}" if len(ok) else "n/a")
        group_rows.append(row)

    def pooled(selected: list[Scored], attack: bool) -> list[str]:
        probs = np.array([r.probs for r in selected if r.probs is not None]).reshape(-1, 3)
        cells = []
        for rule in (threshold, None):
            decisions = accepted(probs, rule)
            cells.append(_rate(int(decisions.sum() if attack else (~decisions).sum()), len(probs)))
        return cells

    for label in dict.fromkeys(g.label for g in groups if g.label != BONA_FIDE):
        metric_rows.append([f"APCER {label}", *pooled([r for r in results if r.group.label == label], True)])
    bona = [r for r in results if r.group.label == BONA_FIDE]
    metric_rows.append(["BPCER all bona fide", *pooled(bona, False)])
    return group_rows, metric_rows


def det_points(bona: np.ndarray, attack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(APCER, BPCER) at every threshold between the observed real-scores (accept iff score >= t)."""
    thresholds = np.unique(np.concatenate([bona, attack, [np.inf]]))
    apcer = np.array([(attack >= t).mean() for t in thresholds])
    bpcer = np.array([(bona < t).mean() for t in thresholds])
    return apcer, bpcer


def plot_det(results: list[Scored], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def real_scores(label: str) -> np.ndarray:
        chosen = [r.probs for r in results if r.probs is not None and r.group.label == label]
        return np.array([p[REAL_CLASS] for p in chosen])

    bona = real_scores(BONA_FIDE)
    labels = list(dict.fromkeys(r.group.label for r in results if r.group.label != BONA_FIDE))
    normal = NormalDist()
    # Probit axes as in ISO/IEC 19795; rates of 0 or 1 are drawn at the plot's edge.
    lo, hi = 0.001, 0.999

    def probit(values: np.ndarray) -> np.ndarray:
        return np.array([normal.inv_cdf(float(v)) for v in np.clip(values, lo, hi)])

    fig, ax = plt.subplots(figsize=(6, 6))
    for label in labels:
        attack = real_scores(label)
        if len(attack) == 0 or len(bona) == 0:
            continue
        apcer, bpcer = det_points(bona, attack)
        ax.step(probit(apcer), probit(bpcer), where="post", label=f"{label} (n={len(attack)})")
        at = [(attack >= threshold).mean()], [(bona < threshold).mean()]
        ax.plot(probit(np.array(at[0])), probit(np.array(at[1])), "o", color=ax.lines[-1].get_color())
    ticks = np.array([0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95, 0.99])
    ax.set_xticks(probit(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_yticks(probit(ticks), [f"{100 * t:g}" for t in ticks])
    ax.set_xlim(probit(np.array([lo, hi])))
    ax.set_ylim(probit(np.array([lo, hi])))
    ax.set_xlabel("APCER (%)")
    ax.set_ylabel(f"BPCER (%), all {len(bona)} bona fide images")
    ax.set_title(f"MiniFASNet V2 + V1SE, DET (dots: threshold {threshold:g})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_latency(results: list[Scored], anti_spoofing: MiniFASNetAntiSpoofing, runs: int) -> dict[str, float]:
    """Median wall time of ``real_scores`` per face (crop, resize and both models), one face per call."""
    samples = [r for r in results if r.status == "ok"][:20]
    if not samples:
        return {}
    images = [(decode_image(r.path.read_bytes()), r.box) for r in samples]
    for image, box in images[:3]:
        anti_spoofing.real_scores(image, [box])  # warm-up: the first calls build the graph
    single = []
    for i in range(runs):
        image, box = images[i % len(images)]
        start = time.perf_counter()
        anti_spoofing.real_scores(image, [box])
        single.append(time.perf_counter() - start)
    image, box = images[0]
    batch = [box] * 8
    batched = []
    for _ in range(max(1, runs // 8)):
        start = time.perf_counter()
        anti_spoofing.real_scores(image, batch)
        batched.append((time.perf_counter() - start) / len(batch))
    return {
        "median_ms_per_face_single": 1000 * float(np.median(single)),
        "p90_ms_per_face_single": 1000 * float(np.percentile(single, 90)),
        "median_ms_per_face_batch8": 1000 * float(np.median(batched)),
        "runs": float(runs),
    }


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: Path, results: list[Scored], threshold: float, command: str, latency: dict[str, float]) -> str:
    group_rows, metric_rows = summarise(results, threshold)
    text = [
        "# Anti-spoofing evaluation (MiniFASNetV2 @2.7 + MiniFASNetV1SE @4.0, YuNet largest face)",
        "",
        f"Command: `{command}`",
        "",
        f"Decisions: *threshold* = bona fide iff mean P(real) >= {threshold:g}; *argmax* = bona fide iff "
        "P(real) is the largest averaged class probability (the reference's rule). Error rates count only "
        "images with a detected face.",
        "",
        "## Summary",
        "",
        _table(["metric", f"threshold {threshold:g}", "argmax"], metric_rows),
        "",
        "## Per group",
        "",
        "Error = BPCER for bona fide groups, APCER for attack groups.",
        "",
        _table(
            [
                "group",
                "label",
                "images",
                "no face",
                "unreadable",
                f"error @ {threshold:g}",
                "error argmax",
                "median P(real)",
            ],
            group_rows,
        ),
        "",
        "![DET](det.png)",
        "",
    ]
    if latency:
        text += [
            "## Latency",
            "",
            f"`real_scores` per face, crop + resize + both models, {int(latency['runs'])} calls: "
            f"median {latency['median_ms_per_face_single']:.2f} ms "
            f"(p90 {latency['p90_ms_per_face_single']:.2f} ms) with one face per call; "
            f"{latency['median_ms_per_face_batch8']:.2f} ms per face with 8 faces per call.",
            "",
        ]
    report = "\n".join(text)
    (out / "report.md").write_text(report)
    return report


def write_scores(path: Path, results: list[Scored]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", "label", "path", "status", "p_class0", "p_real", "p_class2", "box"])
        for r in results:
            probs = ["", "", ""] if r.probs is None else [f"{v:.6f}" for v in r.probs]
            box = "" if r.box is None else " ".join(f"{v:.1f}" for v in r.box)
            writer.writerow([r.group.name, r.group.label, str(r.path), r.status, *probs, box])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bona-fide",
        nargs="*",
        default=[],
        metavar="[NAME=]DIR",
        help="folders (or files) of bona fide presentations",
    )
    parser.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="TYPE=DIR",
        help="attack presentations of one type; repeat for several types",
    )
    parser.add_argument(
        "--reference", action="store_true", help="add the issue's reference sets from ../shared/facedata"
    )
    parser.add_argument("--facedata", type=Path, default=FACEDATA)
    parser.add_argument("--threshold", type=float, default=0.5, help="bona fide iff mean P(real) >= this")
    parser.add_argument("--limit-per-folder", type=int, default=None, help="evenly thin each folder to N images")
    parser.add_argument(
        "--detect-min-side",
        type=int,
        default=300,
        help="YuNet input: smaller images are upscaled to this (the service's default)",
    )
    parser.add_argument("--detect-max-side", type=int, default=640)
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "resources" / "anti_spoof_models")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "antispoof")
    parser.add_argument(
        "--latency",
        type=int,
        default=0,
        metavar="RUNS",
        help="also time real_scores per face over this many calls",
    )
    args = parser.parse_args(argv)

    groups = presentation_groups(args.bona_fide, args.attack, args.limit_per_folder)
    if args.reference:
        groups += antispoof_reference_groups(args.facedata, args.limit_per_folder)
    if not groups:
        parser.error("give --bona-fide / --attack folders, or --reference")
    anti_spoofing = MiniFASNetAntiSpoofing(args.models_dir)
    detector = YuNetDetector(max_side=args.detect_max_side, min_side=args.detect_min_side)
    results = score_all(groups, detector, anti_spoofing)
    latency = measure_latency(results, anti_spoofing, args.latency) if args.latency else {}

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m tools.eval_antispoof " + " ".join(sys.argv[1:] if argv is None else argv)
    report = write_report(args.out, results, args.threshold, command.strip(), latency)
    write_scores(args.out / "scores.csv", results)
    plot_det(results, args.threshold, args.out / "det.png")
    print(report)
    print(f"wrote {args.out / 'report.md'}, scores.csv, det.png")


if __name__ == "__main__":
    main()
