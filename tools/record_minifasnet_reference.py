"""Record the PyTorch reference outputs that the Keras MiniFASNet rebuild is tested against.

Runs in a throwaway environment that has PyTorch, never in the service's venv (torch is no dependency of
the project), from the repository root (``-m`` puts it on the path, so ``api`` and ``tools`` import from the
checkout; pydantic-settings is for ``api.config``, where the repository root is defined)::

    python3.11 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 numpy opencv-contrib-python-headless==4.14.0.94 \
        yuface==2023.5.1 pillow==13.0.0 pydantic-settings==2.16.3
    /tmp/torchenv/bin/python -m tools.record_minifasnet_reference

The reference is the upstream pipeline as deepface 0.0.103 ships it, loaded from the service venv's copy
of deepface by file path (so neither deepface nor TensorFlow is imported): ``FasNetUtils.crop`` for the
crop and ``pytorch/FasNetBackbone.py`` for the network, weights read with ``torch.load``, crops fed as
float 0..255 BGR (deepface's ``ToTensor`` does not divide by 255), softmax per model. Images are decoded
by ``load_rgb`` (PIL, EXIF orientation applied; the tests use the same few lines and check the recorded
pixel checksum, so a change of the service's decoder cannot invalidate the fixture) and faces are found
with the service's YuNet detector; the test crops with our ``crop_box`` and runs our Keras models on the
recorded box.

Writes ``tests/fixtures/minifasnet_reference.json`` (file names relative to ../shared/facedata, boxes,
crop corners and softmax outputs; no pixels) and two tiny torch-written state dicts,
``tests/fixtures/torch_state_dict_{zip,legacy}.pt``, with the values ``tests/ml/test_torch_state_dict.py``
expects.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from api.services.detection import YuNetDetector
from tools.common import FACEDATA, REPO_ROOT, SHARED

FIXTURES = REPO_ROOT / "tests" / "fixtures"

# (file stem, deepface constructor name, crop scale): minivision's naming puts the scale first.
MODELS = (
    ("2.7_80x80_MiniFASNetV2", "MiniFASNetV2", 2.7),
    ("4_0_0_80x80_MiniFASNetV1SE", "MiniFASNetV1SE", 4.0),
)

# Real and attack images of both anti-spoofing sets, and bona fide photos of every identity source,
# including a face cut by the image border (crop clamping) and a multi-megapixel photo.
CASES = (
    "antispoof/silent_face/image_T1.jpg",
    "antispoof/silent_face/image_F1.jpg",
    "antispoof/silent_face/image_F2.jpg",
    "antispoof/pyimagesearch_apfol/real/0.png",
    "antispoof/pyimagesearch_apfol/real/52.png",
    "antispoof/pyimagesearch_apfol/real/104.png",
    "antispoof/pyimagesearch_apfol/real/160.png",
    "antispoof/pyimagesearch_apfol/real/212.png",
    "antispoof/pyimagesearch_apfol/fake/0.png",
    "antispoof/pyimagesearch_apfol/fake/100.png",
    "antispoof/pyimagesearch_apfol/fake/200.png",
    "antispoof/pyimagesearch_apfol/fake/300.png",
    "antispoof/pyimagesearch_apfol/fake/400.png",
    "antispoof/pyimagesearch_apfol/fake/456.png",
    "identity/lfw/images/Aaron_Peirsol/Aaron_Peirsol_0001.jpg",
    "identity/lfw/images/AJ_Cook/AJ_Cook_0001.jpg",
    "identity/deepface/img1.jpg",
    "identity/deepface/img2.jpg",
    "identity/face_recognition/obama.jpg",
    "identity/face_recognition/tests_test_images__obama_partial_face.jpg",
    "identity/compreface/003_A.jpg",
    "identity/compreface/001_A.jpg",
)


def _load_by_path(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default_deepface_dir() -> Path | None:
    found = sorted(REPO_ROOT.glob(".venv/lib/python*/site-packages/deepface/models/spoofing"))
    return found[0] if found else None


def load_rgb(path: Path) -> np.ndarray:
    """Full-resolution RGB pixels, upright per EXIF (tests/ml/test_minifasnet.py decodes the same way)."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_reference(facedata: Path, weights_dir: Path, deepface_dir: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    utils = _load_by_path("ref_fasnet_utils", deepface_dir / "FasNetUtils.py")
    backbone = _load_by_path("ref_fasnet_backbone", deepface_dir / "pytorch" / "FasNetBackbone.py")
    networks = {}
    for stem, ctor, _scale in MODELS:
        # deepface builds both with a 5x5 final depthwise kernel (80 px input / 16).
        net = getattr(backbone, ctor)(conv6_kernel=(5, 5))
        state = torch.load(weights_dir / f"{stem}.pth", map_location="cpu", weights_only=True)
        net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        networks[stem] = net.eval()

    detector = YuNetDetector()
    cases: list[dict[str, Any]] = []
    for relpath in CASES:
        rgb = load_rgb(facedata / relpath)
        faces = detector.detect(rgb)
        if not faces:
            print(f"skip {relpath}: no face found")
            continue
        box = [float(v) for v in faces[0].box]
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        case: dict[str, Any] = {
            "image": relpath,
            "shape": list(rgb.shape),
            "pixels_sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
            "box": box,
            "crop": {},
            "softmax": {},
        }
        for stem, _ctor, scale in MODELS:
            height, width = bgr.shape[:2]
            case["crop"][stem] = [int(v) for v in utils._get_new_box(width, height, box, scale)]
            crop = utils.crop(bgr, box, scale, 80, 80)
            tensor = torch.from_numpy(crop.transpose(2, 0, 1).copy()).float().unsqueeze(0)
            with torch.no_grad():
                probs = torch.softmax(networks[stem](tensor), dim=1)[0].numpy()
            case["softmax"][stem] = [float(v) for v in probs]
        cases.append(case)
        summary = " ".join(f"{np.round(case['softmax'][s], 4).tolist()}" for s, _, _ in MODELS)
        print(f"{relpath}: box {np.round(box, 1).tolist()} -> {summary}")

    record = {
        "generator": "tools/record_minifasnet_reference.py",
        "reference": "deepface 0.0.103 models/spoofing/pytorch/FasNetBackbone.py + FasNetUtils.crop",
        "torch": torch.__version__,
        "input": "load_rgb (PIL, EXIF applied) -> YuNet largest box -> BGR crop, float 0..255",
        "models": {
            stem: {"variant": ctor, "scale": scale, "sha256": _sha256(weights_dir / f"{stem}.pth")}
            for stem, ctor, scale in MODELS
        },
        "cases": cases,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({len(cases)} cases)")


def record_state_dict_fixtures(folder: Path) -> None:
    """Tiny state dicts exercising strides, offsets, shared storages and every storage type we read."""
    import torch

    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) * 0.5
    state: collections.OrderedDict[str, Any] = collections.OrderedDict()
    state["layer.weight"] = base
    state["layer.weight_t"] = base.transpose(0, 2)  # same storage, strides (1, 4, 12)
    state["slice"] = torch.arange(10, dtype=torch.float64)[3:7]  # storage offset 3
    state["half"] = torch.tensor([1.5, -2.0, 65504.0], dtype=torch.float16)
    state["bf16"] = torch.tensor([1.0, -3.5, 0.15625], dtype=torch.bfloat16)
    state["bn.num_batches_tracked"] = torch.tensor(7)
    state["ints"] = torch.arange(-3, 3, dtype=torch.int32)
    state["bytes"] = torch.arange(250, 256, dtype=torch.uint8)
    state["mask"] = torch.tensor([True, False, True])
    state["empty"] = torch.zeros(0, 5)
    state["param"] = torch.nn.Parameter(torch.full((2,), 0.25))
    # nn.Module.state_dict() attaches this attribute; the pickle restores it on the OrderedDict.
    state._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    torch.save(state, folder / "torch_state_dict_zip.pt")
    torch.save(state, folder / "torch_state_dict_legacy.pt", _use_new_zipfile_serialization=False)
    print(f"wrote {folder}/torch_state_dict_{{zip,legacy}}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facedata", type=Path, default=FACEDATA)
    parser.add_argument(
        "--weights",
        type=Path,
        default=SHARED / "models" / "anti_spoof",
        help="folder with the two .pth files",
    )
    parser.add_argument(
        "--deepface-spoofing-dir",
        type=Path,
        default=_default_deepface_dir(),
        help="deepface/models/spoofing of an installed deepface 0.0.103",
    )
    parser.add_argument("--out", type=Path, default=FIXTURES / "minifasnet_reference.json")
    args = parser.parse_args()
    if args.deepface_spoofing_dir is None:
        raise SystemExit("deepface's spoofing folder not found; pass --deepface-spoofing-dir")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    record_state_dict_fixtures(FIXTURES)
    record_reference(args.facedata, args.weights, args.deepface_spoofing_dir, args.out)


if __name__ == "__main__":
    main()
