"""Register, identify (1:N) and compare (1:1): the domain logic behind the recognition endpoints.

Everything here is synchronous and CPU-bound; routers run it in the inference thread pool.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from api.config import Settings
from api.errors import (
    DuplicateFaceError,
    FaceServiceError,
    InconsistentFacesError,
    ModelMismatchError,
    ModelUnavailableError,
    NoFaceError,
    SpoofDetectedError,
)
from api.metrics import stage
from api.services.anti_spoofing import MiniFASNetAntiSpoofing
from api.services.batching import expecting
from api.services.detection import DetectedFace
from api.services.engine import FaceEngine, FaceSelection
from api.services.matching import Calibration, distance_from_similarity, similarity_from_cosine
from api.store import DEFAULT_COLLECTION, FaceStore, SearchResult, UserMatch, UserRecord, WriteGuard

logger = logging.getLogger(__name__)

# Faces of one registration must look like one person. A wrong photo is a mistake to catch, not an
# attack, so this check uses the looser threshold at a per-pair false-match rate of 1e-2: it rejects few
# genuine sets while still catching a different person in the set.
CONSISTENCY_FMR = 1e-2
# The smallest face box (pixels) cut from a reduced decode of a large JPEG: the embedders' chips (150-160 px)
# then come from at least as many source pixels as they have. A smaller face is cut from the full-size photo.
CHIP_FACE = 160


@dataclass(frozen=True)
class ImageUpload:
    filename: str
    data: bytes


@dataclass(frozen=True)
class FoundFace:
    upload: ImageUpload
    image: np.ndarray  # the photo, decoded at full or reduced size
    face: DetectedFace  # in the pixels of ``image``
    scale: float = 1.0  # pixels of ``image`` per pixel of the photo

    @property
    def face_in_photo(self) -> DetectedFace:
        """The face in the photo's own pixels: what answers report."""
        return self.face.scaled(1.0 / self.scale)


@dataclass(frozen=True)
class RegisterOptions:
    """How a registration, or an addition of faces to a user, treats its photos."""

    allow_duplicate: bool = False  # store a face that already matches a registered user of the collection
    refuse_spoofs: bool = False  # run the anti-spoofing gate on every photo
    collection: str = DEFAULT_COLLECTION
    face_crop: bool = False  # every photo is already cropped to one face


@dataclass
class RegisterOutcome:
    user: UserRecord
    rejected: list[tuple[str, FaceServiceError]] = field(default_factory=list)


class ScoredBySimilarity:
    """A result scored by calibrated similarity that also reports it as the distance the API shows."""

    similarity: float

    @property
    def distance(self) -> float:
        return float(distance_from_similarity(self.similarity))


@dataclass(frozen=True)
class Match(ScoredBySimilarity):
    user_id: str
    name: str
    similarity: float


@dataclass(frozen=True)
class VerifyOutcome:
    verified: bool
    best: Match | None
    threshold: float
    candidates: list[Match]
    face: DetectedFace


@dataclass(frozen=True)
class CompareOutcome(ScoredBySimilarity):
    verified: bool
    similarity: float
    threshold: float


Method = TypeVar("Method", bound=Callable[..., Any])


def _announces_embedding(method: Method) -> Method:
    """A use case that embeds faces after decoding and detecting them: it tells a batching embedder at once,
    so that a batch forming meanwhile waits for its faces (api.services.batching)."""

    @functools.wraps(method)
    def announced(self: RecognitionService, *args: Any, **kwargs: Any) -> Any:
        with expecting(self.engine.embedder):
            return method(self, *args, **kwargs)

    return announced  # type: ignore[return-value]


class RecognitionService:
    def __init__(
        self,
        engine: FaceEngine,
        calibration: Calibration,
        settings: Settings,
        anti_spoofing: MiniFASNetAntiSpoofing | None = None,
    ) -> None:
        self.engine = engine
        self.calibration = calibration
        self.settings = settings
        self.anti_spoofing = anti_spoofing
        if calibration.model_id != engine.model_id:
            logger.warning(
                "Thresholds were calibrated for %s but the embedder is %s: set FACE_COMPARE_THRESHOLD and "
                "FACE_IDENTIFY_THRESHOLD, or recalibrate with python -m tools.eval_lfw --calibrate",
                calibration.model_id,
                engine.model_id,
            )

    # --- thresholds -------------------------------------------------------------------------------------
    @property
    def compare_threshold(self) -> float:
        configured = self.settings.compare_threshold
        return configured if configured is not None else self.calibration.compare_threshold

    def identify_threshold(self, gallery_users: int) -> float:
        configured = self.settings.identify_threshold
        return configured if configured is not None else self.calibration.identify_threshold(gallery_users)

    def duplicate_threshold(self, comparisons: int) -> float:
        """The duplicate check at registration compares every new face with every stored face of the
        collection: the gallery-size rule applied to that number of comparisons keeps the chance that a new
        person is refused as someone else near 1% per registration (counting users alone let it reach ~10%
        on 40 LFW people with 2 photos each)."""
        configured = self.settings.identify_threshold
        return configured if configured is not None else self.calibration.identify_threshold(comparisons)

    # --- shared steps -----------------------------------------------------------------------------------
    def find_face(
        self, upload: ImageUpload, selection: FaceSelection, refuse_spoofs: bool, face_crop: bool = False
    ) -> FoundFace:
        """``face_crop``: the client cropped the image to one face; the whole image is that face."""
        max_pixels = self.settings.max_image_pixels
        decoded = self.engine.decode(upload.data, max_pixels, face_crop)
        with stage("detect"):
            if face_crop:
                face = self.engine.face_of_crop(decoded.pixels)
            else:
                faces = self.engine.detect(decoded.pixels)
                face = self.engine.select_face(decoded.pixels, faces, selection, decoded.scale)
        image, (face,), scale = self.engine.at_full_size_if_small(upload.data, max_pixels, decoded, [face], CHIP_FACE)
        if refuse_spoofs:
            with stage("anti_spoofing"):
                self.refuse_spoof(image, face)
        return FoundFace(upload, image, face, scale)

    def refuse_spoof(self, image: np.ndarray, face: DetectedFace) -> None:
        """The anti-spoofing gate of ``liveness=true``: a photo or screen replay raises SPOOF_DETECTED."""
        if self.anti_spoofing is None:
            raise ModelUnavailableError(
                "Liveness was requested but the anti-spoofing models are not loaded; run `make models` "
                "(python -m tools.fetch_models) with network access or FACE_MODELS_MIRROR set."
            )
        score = float(self.anti_spoofing.real_scores(image, [face.box])[0])
        if score < self.settings.liveness_threshold:
            raise SpoofDetectedError(
                "The face looks like a photo or screen replay, not a live person.",
                real_score=round(score, 4),
                threshold=self.settings.liveness_threshold,
            )

    def _embed_found(self, found: list[FoundFace]) -> np.ndarray:
        with stage("align"):
            chips = np.concatenate([self.engine.align(f.image, [f.face]) for f in found])
        with stage("embed"):
            return self.engine.embed_chips(chips)

    def _collect(
        self, uploads: list[ImageUpload], refuse_spoofs: bool, face_crop: bool = False
    ) -> tuple[list[FoundFace], list[tuple[str, FaceServiceError]]]:
        found, rejected = [], []
        for upload in uploads:
            try:
                found.append(self.find_face(upload, "single", refuse_spoofs, face_crop))
            except SpoofDetectedError as exc:
                exc.details["file"] = upload.filename
                raise  # a spoof in a registration stops it whole: nothing from it is stored
            except FaceServiceError as exc:
                rejected.append((upload.filename, exc))
        if not found:
            if len(rejected) == 1:
                raise rejected[0][1]
            raise NoFaceError(
                "None of the images holds exactly one usable face.",
                rejected=[{"file": name, "code": exc.code, "message": exc.message} for name, exc in rejected],
            )
        return found, rejected

    def _check_consistent(self, found: list[FoundFace], embeddings: np.ndarray, reference: np.ndarray) -> None:
        """Every new face must match the others (and the user's stored faces, when adding)."""
        threshold = self.calibration.threshold_at_fmr(CONSISTENCY_FMR)
        pool = np.concatenate([reference, embeddings]) if len(reference) else embeddings
        if len(pool) < 2:
            return
        similarity = similarity_from_cosine(pool @ pool.T)
        np.fill_diagonal(similarity, 1.0)
        offset = len(reference)
        for i in range(len(embeddings)):
            others = np.delete(similarity[offset + i], offset + i)
            if others.max() < threshold:
                raise InconsistentFacesError(
                    f"The face in {found[i].upload.filename!r} does not look like the same person as the others.",
                    file=found[i].upload.filename,
                    similarity=round(float(others.max()), 4),
                    threshold=round(threshold, 4),
                )

    def _checked_guard(
        self, found: list[FoundFace], embeddings: np.ndarray, reference: np.ndarray, allow_duplicate: bool
    ) -> WriteGuard | None:
        """The consistency check of new faces (against ``reference``, the user's stored ones), then the write
        guard that refuses duplicates, unless they are allowed."""
        self._check_consistent(found, embeddings, reference)
        return None if allow_duplicate else self._refuse_duplicates

    def _refuse_duplicates(self, found: SearchResult) -> None:
        """The store's write guard: runs inside the write's lock or transaction, so two registrations of one
        new face (on any nodes) cannot both pass it. ``found`` holds each new face's best other user."""
        if found.users == 0:
            return
        threshold = self.duplicate_threshold(found.faces * len(found.matches))
        for matches in found.matches:
            for match in matches:
                similarity = float(similarity_from_cosine(match.cosine))
                if similarity >= threshold:
                    raise DuplicateFaceError(
                        f"This face is already registered as {match.name!r}; "
                        "pass allow_duplicate=true to register it anyway.",
                        user={"id": match.user_id, "name": match.name},
                        similarity=round(similarity, 4),
                    )

    def _refuse_other_models(self, result: SearchResult, collection: str) -> None:
        """A search sees only descriptors of the configured model; answering "nobody" while the collection
        holds people enrolled with another embedder would be a silent wrong answer."""
        if not result.other_models:
            return
        others = ", ".join(f"{model} ({users} users)" for model, users in sorted(result.other_models.items()))
        raise ModelMismatchError(
            f"The collection {collection!r} holds people enrolled with another embedder: {others}. This service "
            f"embeds with {self.engine.model_id}, and descriptors of different models cannot be compared or "
            "converted. Re-enrol those people from their photos with the configured embedder (face-service "
            "enroll DIR --replace; photos are never stored), or set FACE_EMBEDDER back to the model they were "
            "enrolled with.",
            configured_model=self.engine.model_id,
            stored_models=result.other_models,
        )

    # --- use cases --------------------------------------------------------------------------------------
    @_announces_embedding
    def register(
        self, store: FaceStore, name: str, uploads: list[ImageUpload], options: RegisterOptions = RegisterOptions()
    ) -> RegisterOutcome:
        store.get_collection(options.collection)  # COLLECTION_NOT_FOUND before any inference
        found, rejected = self._collect(uploads, options.refuse_spoofs, options.face_crop)
        return self.register_embedded(
            store, name, found, rejected, self._embed_found(found), options.allow_duplicate, options.collection
        )

    @_announces_embedding
    def add_faces(
        self, store: FaceStore, user_id: str, uploads: list[ImageUpload], options: RegisterOptions = RegisterOptions()
    ) -> RegisterOutcome:
        collection = options.collection
        existing = store.embeddings_of(user_id, collection=collection)  # USER_NOT_FOUND before any inference
        found, rejected = self._collect(uploads, options.refuse_spoofs, options.face_crop)
        embeddings = self._embed_found(found)
        guard = self._checked_guard(found, embeddings, np.asarray(existing, np.float32), options.allow_duplicate)
        user = store.add_faces(user_id, embeddings, self.engine.model_id, collection=collection, guard=guard)
        return RegisterOutcome(user, rejected)

    @_announces_embedding
    def verify(
        self,
        store: FaceStore,
        upload: ImageUpload,
        threshold: float | None,
        top_k: int,
        refuse_spoofs: bool,
        collection: str = DEFAULT_COLLECTION,
        face_crop: bool = False,
    ) -> VerifyOutcome:
        store.get_collection(collection)  # COLLECTION_NOT_FOUND before any inference
        found = self.find_face(upload, "largest", refuse_spoofs, face_crop)
        embedding = self._embed_found([found])[0]
        with stage("search"):
            result = store.search(self.engine.model_id, embedding[None, :], max(top_k, 1), collection=collection)
        self._refuse_other_models(result, collection)
        applied = threshold if threshold is not None else self.identify_threshold(result.users)
        if not result.matches[0]:
            return VerifyOutcome(False, None, applied, [], found.face_in_photo)
        candidates = [self._match(m) for m in result.matches[0]]
        best = candidates[0]
        verified = best.similarity >= applied
        return VerifyOutcome(verified, best, applied, candidates[:top_k], found.face_in_photo)

    @_announces_embedding
    def compare(
        self,
        first: ImageUpload,
        second: ImageUpload,
        threshold: float | None,
        refuse_spoofs: bool,
        face_crop: bool = False,
    ) -> CompareOutcome:
        faces = [self.find_face(upload, "largest", refuse_spoofs, face_crop) for upload in (first, second)]
        embeddings = self._embed_found(faces)
        similarity = float(similarity_from_cosine(float(embeddings[0] @ embeddings[1])))
        applied = threshold if threshold is not None else self.compare_threshold
        return CompareOutcome(similarity >= applied, similarity, applied)

    @staticmethod
    def _match(match: UserMatch) -> Match:
        return Match(match.user_id, match.name, float(similarity_from_cosine(match.cosine)))

    # --- bulk enrolment (api.enrollment): register's steps, split so that embedding spans many people -------
    def collect_faces(
        self, uploads: list[ImageUpload], refuse_spoofs: bool
    ) -> tuple[list[FoundFace], list[tuple[str, FaceServiceError]]]:
        """Register's first step for one person: decode, detect, exactly one usable face per photo, and the
        anti-spoofing gate, with register's rules (a spoof stops the person; no usable photo raises).

        Public so that bulk enrolment can run it for several people at once in a thread pool: YuNet and
        OpenCV release the GIL, so decoding and detection of different people overlap on every core.
        """
        return self._collect(uploads, refuse_spoofs)

    def face_chips(self, found: list[FoundFace]) -> np.ndarray:
        """The aligned chips of ``found``, in order: what ``engine.embed_chips`` takes. Bulk enrolment stacks
        the chips of many people into one embedding batch, which costs about half as much per face as
        embedding each person's one or two faces on their own (docs/benchmarks.md)."""
        return np.concatenate([self.engine.align(f.image, [f.face]) for f in found])

    def register_embedded(
        self,
        store: FaceStore,
        name: str,
        found: list[FoundFace],
        rejected: list[tuple[str, FaceServiceError]],
        embeddings: np.ndarray,
        allow_duplicate: bool,
        collection: str = DEFAULT_COLLECTION,
    ) -> RegisterOutcome:
        """Register's last steps once the faces are embedded (``embeddings[i]`` is ``found[i]``'s descriptor):
        the consistency check, then ``add_user`` with the duplicate check as its write guard. ``register`` ends
        here, and bulk enrolment, which embeds many people's faces in one batch, too: both store the same."""
        if len(embeddings) != len(found):
            raise ValueError(f"{len(found)} faces but {len(embeddings)} descriptors")
        no_faces_yet = np.zeros((0, embeddings.shape[1]), np.float32)
        guard = self._checked_guard(found, embeddings, no_faces_yet, allow_duplicate)
        user = store.add_user(name, embeddings, self.engine.model_id, collection=collection, guard=guard)
        return RegisterOutcome(user, rejected)
