"""Two-pass against single-pass YuNet detection on real photos: faces found, descriptor agreement, CPU time.

python -m tools.compare_detection                      # the identity and emotion photos in ../shared
python -m tools.compare_detection --photos DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from api.config import Settings
from api.errors import FaceServiceError
from api.services.detection import YuNetDetector
from api.services.engine import build_engine
from api.services.imaging import decode_image
from tools.common import FACEDATA

DEFAULT_FOLDERS = [
    FACEDATA / "identity" / "deepface",
    FACEDATA / "identity" / "face_recognition",
    FACEDATA / "identity" / "compreface",
    FACEDATA / "emotion" / "faceapi",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", nargs="+", type=Path, default=DEFAULT_FOLDERS)
    parser.add_argument("--first-pass-side", type=int, default=320)
    parser.add_argument("--first-pass-min-face", type=int, default=40)
    args = parser.parse_args()

    engine = build_engine(Settings())
    single = YuNetDetector(first_pass_side=0)
    two_pass = YuNetDetector(first_pass_side=args.first_pass_side, first_pass_min_face=args.first_pass_min_face)
    files = sorted(p for folder in args.photos for p in folder.glob("*") if p.suffix.lower() in {".jpg", ".png"})
    cosines, counts, times, differing = [], [0, 0], ([], []), []
    for path in files:
        try:
            image = decode_image(path.read_bytes())
        except FaceServiceError:
            continue
        found = []
        for index, detector in enumerate((single, two_pass)):
            started = time.process_time()
            found.append(detector.detect(image))
            times[index].append(time.process_time() - started)
            counts[index] += len(found[-1])
        if len(found[0]) != len(found[1]):
            differing.append(f"{path.name}: {[round(f.size) for f in found[0]]} -> {[round(f.size) for f in found[1]]}")
        if found[0] and found[1]:
            first, second = engine.embed(image, [found[0][0]])[0], engine.embed(image, [found[1][0]])[0]
            cosines.append(float(first @ second))
    agreement = np.array(cosines)
    print(f"photos: {len(times[0])}; faces single pass {counts[0]}, two-pass {counts[1]}")
    print(f"largest face descriptor cosine: median {np.median(agreement):.4f}, min {agreement.min():.4f}")
    print(f"detect CPU ms median: single {1000 * np.median(times[0]):.1f}, two-pass {1000 * np.median(times[1]):.1f}")
    for line in differing:
        print("  face sizes differ:", line)


if __name__ == "__main__":
    main()
