"""Measure where YuNet's five landmarks fall inside dlib's 150x150 face chips (padding 0.25).

dlib aligns with its own 5-point shape predictor (eye corners and the base of the nose); YuNet gives eye
centres, nose tip and mouth corners. To reproduce dlib's chip from YuNet points, we need those points'
positions in dlib's chip layout. For each face this tool

1. builds dlib's chip for the face (HOG detector + 5-point predictor + ``get_face_chip_details``),
2. recovers dlib's exact chip-to-image mapping by extracting the chip from two float "coordinate images"
   (pixel value = x, resp. y; bilinear sampling of a linear ramp is exact) and fitting an affine map,
3. maps YuNet's landmarks of the same face into chip coordinates,

and prints the mean position of each landmark (the template in ``api/services/alignment.py``) with its
spread. Run: ``python -m tools.derive_chip_template --limit 1500``.
"""

from __future__ import annotations

import argparse

import cv2
import dlib
import face_recognition_models
import numpy as np

from api.services.detection import YuNetDetector
from tools.common import SHARED, lfw_images

CHIP = 150
PADDING = 0.25


def dlib_chip_to_image_affine(image_shape: tuple[int, int], details) -> np.ndarray:
    """2x3 matrix A with [x, y] = A @ [col, row, 1] for every chip pixel, read from dlib itself."""
    height, width = image_shape
    xs = np.tile(np.arange(width, dtype=np.float32), (height, 1))
    ys = np.tile(np.arange(height, dtype=np.float32)[:, None], (1, width))
    chip_x = np.asarray(dlib.extract_image_chip(xs, details), np.float64)
    chip_y = np.asarray(dlib.extract_image_chip(ys, details), np.float64)
    rows, cols = np.mgrid[0:CHIP, 0:CHIP]
    # Border pixels sample outside the image and are clamped: fit on the interior only.
    inside = (chip_x > 1) & (chip_x < width - 2) & (chip_y > 1) & (chip_y < height - 2)
    design = np.stack([cols[inside], rows[inside], np.ones(inside.sum())], axis=1)
    ax, *_ = np.linalg.lstsq(design, chip_x[inside], rcond=None)
    ay, *_ = np.linalg.lstsq(design, chip_y[inside], rcond=None)
    return np.stack([ax, ay])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=1500, help="number of LFW images to use")
    args = parser.parse_args()

    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    yunet = YuNetDetector()
    points = []
    for path in lfw_images(SHARED)[: args.limit]:
        rgb = cv2.imread(str(path))[:, :, ::-1].copy()
        dets = hog(rgb, 1)
        faces = yunet.detect(rgb)
        if len(dets) != 1 or len(faces) != 1 or faces[0].landmarks is None:
            continue  # only unambiguous faces, so both detectors surely saw the same person
        details = dlib.get_face_chip_details(predictor(rgb, dets[0]), size=CHIP, padding=PADDING)
        to_image = np.vstack([dlib_chip_to_image_affine(rgb.shape[:2], details), [0, 0, 1]])
        to_chip = np.linalg.inv(to_image)[:2]
        marks = faces[0].landmarks.astype(np.float64)
        points.append(marks @ to_chip[:, :2].T + to_chip[:, 2])
    stacked = np.stack(points)
    mean, spread = stacked.mean(axis=0), stacked.std(axis=0)
    print(f"faces used: {len(points)}")
    for name, (x, y), (sx, sy) in zip(
        ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right"), mean, spread, strict=True
    ):
        print(f"{name:12s} x={x:8.3f} y={y:8.3f}   std x={sx:5.2f} y={sy:5.2f}")
    print("template = " + np.array2string(mean, precision=3, separator=", "))


if __name__ == "__main__":
    main()
