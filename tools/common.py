"""Helpers shared by the tools: where the repository and the development data live, and how LFW lists are read.

The loaders of the other data sets (FER2013 and labelled emotion photos, anti-spoofing sets) are in
:mod:`tools.datasets`; these LFW readers stay here, light to import, for the tests and load tools as well.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from api.config import REPO_ROOT

__all__ = [
    "FACEDATA",
    "LFW",
    "REPO_ROOT",
    "SHARED",
    "Pair",
    "child_pids",
    "configured_embedder",
    "embedder_tag",
    "free_port",
    "lfw_image_path",
    "lfw_images",
    "lfw_people",
    "memory_kb",
    "non_default_embedder",
    "read_pairs",
]

# Development data sits beside the checkout (never inside it); FACE_SHARED_DIR points elsewhere.
SHARED = Path(os.environ.get("FACE_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()
FACEDATA = SHARED / "facedata"
LFW = FACEDATA / "identity" / "lfw"


def lfw_images(shared: Path = SHARED) -> list[Path]:
    return sorted((shared / "facedata" / "identity" / "lfw" / "images").glob("*/*.jpg"))


def lfw_people(count: int, images: Path = LFW / "images") -> list[tuple[str, list[Path]]]:
    """The first ``count`` LFW people (folders ``images/<Name>/<Name>_NNNN.jpg``, sorted by name) that have
    at least two photos, each with its photos in order (fewer people when LFW holds fewer)."""
    people = []
    for folder in sorted(path for path in images.iterdir() if path.is_dir()):
        photos = sorted(folder.glob("*.jpg"))
        if len(photos) >= 2:
            people.append((folder.name, photos))
            if len(people) == count:
                break
    return people


@dataclass(frozen=True)
class Pair:
    first: Path
    second: Path
    same: bool


def lfw_image_path(images_dir: Path, name: str, number: int) -> Path:
    return images_dir / name / f"{name}_{number:04d}.jpg"


def read_pairs(pairs_file: Path, images_dir: Path) -> list[Pair]:
    """Pairs in LFW's format: an optional count line, then ``name n1 n2`` (same) or ``name1 n1 name2 n2``."""
    pairs = []
    for line in pairs_file.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3:
            name, a, b = fields
            pairs.append(Pair(lfw_image_path(images_dir, name, int(a)), lfw_image_path(images_dir, name, int(b)), True))
        elif len(fields) == 4:
            name_a, a, name_b, b = fields
            pairs.append(
                Pair(
                    lfw_image_path(images_dir, name_a, int(a)),
                    lfw_image_path(images_dir, name_b, int(b)),
                    False,
                )
            )
    return pairs


def configured_embedder() -> tuple[str, int]:
    """The model id and descriptor size of the embedder the settings select (``FACE_EMBEDDER``): what a tool
    that seeds a store with synthetic descriptors must write so that the service can search them. Loads the
    embedder's model files (seconds), nothing else."""
    from api.config import Settings
    from api.services.embedding import build_embedder

    settings = Settings()
    embedder = build_embedder(
        settings.embedder, settings.embedding_model_path, settings.flip_augmentation, 1, settings.facenet_model_path
    )
    return embedder.model_id, embedder.dimension


def memory_kb(pid: int) -> dict[str, int]:
    """Resident memory of process ``pid`` now (VmRSS) and at its peak (VmHWM), in KiB, from /proc. Here, in
    this light module, so that a process whose memory is measured need not import the app to measure it."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (a server's workers), from /proc; [] once it has exited."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def non_default_embedder() -> str | None:
    """``FACE_EMBEDDER`` when it selects another embedder than the default one, else None."""
    from api.config import Settings

    embedder = Settings().embedder
    return None if embedder == Settings.model_fields["embedder"].default else embedder


def embedder_tag() -> str:
    """A file-name suffix that keeps the caches and results of a non-default embedder apart ("" by default)."""
    embedder = non_default_embedder()
    return "" if embedder is None else "_" + "".join(c if c.isalnum() else "_" for c in embedder)
