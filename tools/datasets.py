"""The one loader of each development data set that the evaluation and training tools read.

* Emotion (``tools.eval_emotion``, ``tools.train_emotion``): FER2013 (the Training/PublicTest zip and the
  PrivateTest half folder), face-api.js' posed photos and the robustness photos whose manifest row has an
  emotion label, as labelled :class:`Sample` sets or, for training, as arrays.
* Anti-spoofing (``tools.eval_antispoof``): folders of bona fide and attack presentations, and the
  reference sets from ``../shared``, as :class:`PresentationGroup` lists.

LFW (pair lists and images) is read by :mod:`tools.common`. Nothing here is ever copied into the repository.
"""

from __future__ import annotations

import csv
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from api.services.emotion import EMOTION_LABELS, FACE_SIZE
from tools.common import FACEDATA

# --- emotion ---------------------------------------------------------------------------------------------
FER2013_ZIP = FACEDATA / "emotion" / "fer2013_train_publictest.zip"  # Training and PublicTest splits
FER2013_PRIVATETEST = FACEDATA / "emotion" / "fer2013_privatetest"  # half of PrivateTest, <label>/<image>
FACEAPI_PHOTOS = FACEDATA / "emotion" / "faceapi"

# Label words in file names, by their stem: "disgusted", "fearful", "surprised", "happiness", ...
_LABEL_STEMS = {"ang": "angry", "disg": "disgust", "fear": "fear", "happ": "happy", "sad": "sad",
                "surp": "surprise", "neut": "neutral"}  # fmt: skip


@dataclass
class Sample:
    """One labelled image: a 48x48 face (``face``) or a photo to detect in (``photo``)."""

    name: str
    label: int
    face: np.ndarray | None = None
    photo: np.ndarray | None = None


@dataclass
class EvalSet:
    name: str
    samples: list[Sample] = field(default_factory=list)


def label_from_name(name: str) -> int | None:
    for token in re.split(r"[^a-z]+", Path(name).stem.lower()):
        for stem, label in _LABEL_STEMS.items():
            if token.startswith(stem):
                return EMOTION_LABELS.index(label)
    return None


def _sample(name: str, label: int, data: bytes | Path) -> Sample | None:
    if isinstance(data, Path):
        data = data.read_bytes()
    # IMREAD_COLOR applies the EXIF orientation, as a phone photo must be turned upright first.
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    if max(bgr.shape[:2]) <= 64:  # a face crop already (FER2013 is 48x48): no detector
        grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        if grey.shape != (FACE_SIZE, FACE_SIZE):
            grey = cv2.resize(grey, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_AREA)
        return Sample(name, label, face=grey)
    return Sample(name, label, photo=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def load_emotion_set(spec: str | Path) -> EvalSet:
    """A folder ``<label>/<image>``, a folder of photos named by label, or ``archive.zip:split``."""
    spec = str(spec)
    if ".zip:" in spec or spec.endswith(".zip"):
        path, _, split = spec.partition(".zip")
        zip_path, prefix = Path(path + ".zip"), split.lstrip(":").strip("/")
        result = EvalSet(f"{zip_path.stem}:{prefix}" if prefix else zip_path.stem)
        with zipfile.ZipFile(zip_path) as archive:
            for name in sorted(archive.namelist()):
                parts = name.split("/")
                if prefix and (len(parts) < 3 or parts[0] != prefix):
                    continue
                if name.endswith("/") or parts[-2] not in EMOTION_LABELS:
                    continue
                sample = _sample(name, EMOTION_LABELS.index(parts[-2]), archive.read(name))
                if sample is not None:
                    result.samples.append(sample)
        return result
    folder = Path(spec)
    result = EvalSet(folder.name)
    label_dirs = [folder / label for label in EMOTION_LABELS if (folder / label).is_dir()]
    if label_dirs:
        for directory in label_dirs:
            for path in sorted(directory.iterdir()):
                sample = _sample(path.name, EMOTION_LABELS.index(directory.name), path)
                if sample is not None:
                    result.samples.append(sample)
    else:
        for path in sorted(folder.iterdir()):
            label = label_from_name(path.name)
            if label is not None and path.is_file():
                sample = _sample(path.name, label, path)
                if sample is not None:
                    result.samples.append(sample)
    return result


def fer2013_split(zip_path: Path = FER2013_ZIP, split: str = "publictest") -> EvalSet:
    """One split (``train`` or ``publictest``) of the FER2013 zip, read without extracting it."""
    return load_emotion_set(f"{zip_path}:{split}")


def fer2013_arrays(spec: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The faces of ``spec`` (as :func:`load_emotion_set` reads it) as (N, 48, 48) uint8 and (N,) int32 labels.

    Decoded once into memory (28k x 48 x 48 bytes is 65 MB): training then only slices it.
    """
    samples = load_emotion_set(spec).samples
    if not samples:
        raise ValueError(f"no labelled images in {spec}")
    if any(sample.face is None for sample in samples):
        raise ValueError(f"{spec}: not all images are face crops (at most 64 px)")
    return np.stack([s.face for s in samples]), np.asarray([s.label for s in samples], dtype=np.int32)


def load_manifest_emotion_photos(facedata: Path, exclude_prefix: tuple[str, ...]) -> EvalSet:
    """Photos whose manifest row carries ``emotion=<label>`` (outside the folders evaluated already)."""
    result = EvalSet("manifest emotion photos")
    manifest = facedata / "manifest.csv"
    if not manifest.is_file():
        return result
    with manifest.open(newline="") as handle:
        for row in csv.DictReader(handle):
            match = re.search(r"emotion=([a-z]+)", row.get("labels", ""))
            if not match or row["relpath"].startswith(exclude_prefix):
                continue
            label = label_from_name(match.group(1))
            path = facedata / row["relpath"]
            if label is not None and path.is_file():
                sample = _sample(row["relpath"], label, path)
                if sample is not None:
                    result.samples.append(sample)
    return result


def emotion_suite() -> list[EvalSet]:
    """The standard emotion sets: the FER2013 PrivateTest half, face-api.js' photos and the robustness
    photos with an emotion label in the manifest (the last only where there are any)."""
    if not FACEDATA.is_dir():
        raise SystemExit(f"{FACEDATA} is absent: give sources explicitly")
    private = load_emotion_set(FER2013_PRIVATETEST)
    private.name = "FER2013 PrivateTest (half)"
    faceapi = load_emotion_set(FACEAPI_PHOTOS)
    faceapi.name = "face-api.js photos"
    sets = [private, faceapi]
    others = load_manifest_emotion_photos(FACEDATA, ("emotion/",))
    if others.samples:
        others.name = "robustness photos with emotion labels"
        sets.append(others)
    return sets


# --- anti-spoofing ---------------------------------------------------------------------------------------
BONA_FIDE = "bona fide"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class PresentationGroup:
    name: str
    label: str  # BONA_FIDE or the attack type (e.g. "replay", "print")
    paths: tuple[Path, ...]


def list_images(source: Path, limit: int | None) -> list[Path]:
    """Images under ``source`` (a file or a folder, searched recursively), evenly thinned to ``limit``."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise SystemExit(f"no such file or folder: {source}")
    paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if limit is not None and len(paths) > limit:
        # Evenly spaced over the sorted list rather than the first N: LFW's folders are alphabetical by
        # person, so a prefix would cover only a few people.
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    return paths


def _split(spec: str, default_name: str | None) -> tuple[str, Path]:
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, Path(path)
    if default_name is None:
        raise SystemExit(f"--attack expects NAME=DIR, got {spec!r}")
    return Path(spec).name or default_name, Path(spec)


def presentation_groups(bona_fide: list[str], attacks: list[str], limit: int | None) -> list[PresentationGroup]:
    """Groups from ``[NAME=]DIR`` (bona fide) and ``TYPE=DIR`` (attack) specifications."""
    groups = []
    for spec in bona_fide:
        name, path = _split(spec, "bona fide")
        groups.append(PresentationGroup(name, BONA_FIDE, tuple(list_images(path, limit))))
    for spec in attacks:
        name, path = _split(spec, None)
        groups.append(PresentationGroup(f"{name}: {path.name}", name, tuple(list_images(path, limit))))
    return groups


def antispoof_reference_groups(facedata: Path, limit: int | None) -> list[PresentationGroup]:
    """The issue's reference sets: replay frames, the print/screen samples, identity photos as bona fide."""
    if not facedata.is_dir():
        raise SystemExit(f"{facedata} is absent: --reference needs the development data in ../shared")
    apfol = facedata / "antispoof" / "pyimagesearch_apfol"
    silent = facedata / "antispoof" / "silent_face"
    identity = facedata / "identity"

    def group(name: str, label: str, source: Path) -> PresentationGroup:
        return PresentationGroup(name, label, tuple(list_images(source, limit)))

    return [
        group("apfol real frames", BONA_FIDE, apfol / "real"),
        PresentationGroup("silent_face image_T1", BONA_FIDE, (silent / "image_T1.jpg",)),
        group("lfw", BONA_FIDE, identity / "lfw" / "images"),
        group("deepface", BONA_FIDE, identity / "deepface"),
        group("face_recognition", BONA_FIDE, identity / "face_recognition"),
        group("compreface", BONA_FIDE, identity / "compreface"),
        group("replay: apfol fake frames", "replay", apfol / "fake"),
        PresentationGroup("print: silent_face image_F1", "print", (silent / "image_F1.jpg",)),
        PresentationGroup("screen: silent_face image_F2", "screen", (silent / "image_F2.jpg",)),
    ]
