"""All configuration in one settings class, read from the environment with the prefix ``FACE_``."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
# The same rule as api.store.base.COLLECTION_NAME_PATTERN (config must not import the store package).
COLLECTION_NAME_PATTERN = r"^[a-z0-9_-]{1,64}$"


class ApiKeyEntry(BaseModel):
    """One configured key: only the sha256 of the key is ever stored (``python -m api.keys new``)."""

    name: str = Field(min_length=1, max_length=100)
    scope: Literal["admin", "client"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The collections this key may use; None (absent) = all of them.
    collections: list[Annotated[str, Field(pattern=COLLECTION_NAME_PATTERN)]] | None = None
    # This key's own rate limit (e.g. "100/minute"), instead of FACE_RATE_LIMIT.
    rate_limit: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACE_", env_file=".env", extra="ignore")

    env: Literal["development", "production", "test"] = "development"

    # --- models -------------------------------------------------------------------------------------
    resources_dir: Path = REPO_ROOT / "resources"
    embedding_model_path: Path = REPO_ROOT / "face_embedding_model.keras"
    facenet_model_path: Path = REPO_ROOT / "facenet_embedding_model.keras"
    # YuNet's network as an ONNX graph, written by `make models` from the weights in libfacedetection's library.
    detector_model_path: Path = REPO_ROOT / "resources" / "face_detector_yunet.onnx"
    # Offline mirror of weights that no package ships (anti-spoofing); set-up copies from here.
    models_mirror: Path | None = None
    detector: str = Field("yunet", description="yunet, or a deepface detector backend: opencv, mtcnn, dlib, ssd, ...")
    embedder: str = Field(
        "dlib-resnet",
        description="dlib-resnet, facenet, dlib-resnet+facenet (one fused descriptor) or deepface:<ModelName>",
    )
    # Large photos are downscaled so that the longer side is at most this before detection.
    detect_max_side: int = 640
    # Small photos are upscaled to at least this so that faces of ~60 px are found with precise landmarks.
    detect_min_side: int = 300
    # Large photos are first searched at this size (0 = off); the full pass runs only if that finds no face
    # or a small one (< 40 px at this size). About 3x faster on single-portrait photos.
    detect_first_pass_side: int = 320
    # Large JPEGs are decoded at 1/2, 1/4 or 1/8 size (libjpeg's reduced decoding) while their longer side
    # stays >= detect_max_side; a face too small for the models' crops is then cut from a full-size decode.
    reduced_decoding: bool = True
    detection_confidence: float = Field(0.6, ge=0.0, le=1.0)
    # onnx: YuNet's network, rebuilt from libfacedetection's weights, runs in ONNX Runtime (half the time);
    # library: libfacedetection itself (whole-pixel coordinates), as the service detected before.
    detector_runtime: Literal["onnx", "library"] = "onnx"
    min_face_size: int = Field(40, description="Faces whose box is smaller (px, original image) are rejected")
    flip_augmentation: bool = True
    # onnx: every network runs from its ONNX export (built by `make models`) and TensorFlow is never imported;
    # keras: the .keras files run in TensorFlow (bfloat16 emotion, or a model without an export).
    inference_runtime: Literal["onnx", "keras"] = "onnx"

    # --- matching (similarity units, in [0, 1]) ------------------------------------------------------
    compare_threshold: float | None = Field(None, ge=0.0, le=1.0, description="1:1; None = calibrated value")
    identify_threshold: float | None = Field(None, ge=0.0, le=1.0, description="1:N; None = gallery-size rule")

    # --- storage -------------------------------------------------------------------------------------
    store_path: Path = REPO_ROOT / "face_database.npz"
    store_lock_timeout_s: float = 30.0
    # postgresql://user:password@host:port/database selects the PostgreSQL + pgvector store (several nodes,
    # millions of users); unset, the .npz file at store_path. Never logged or shown (repr=False).
    store_url: str | None = Field(None, repr=False)
    store_pool_size: int = Field(8, ge=1, description="Connections per service process (PostgreSQL store)")
    store_timeout_s: float = Field(5.0, gt=0, description="Wait for a database connection before 503")
    store_hnsw_ef_search: int = Field(100, ge=1, le=1000, description="HNSW candidate list per search")
    store_hnsw_guard_ef_search: int | None = Field(
        None, ge=1, le=1000, description="HNSW candidate list of the duplicate check; unset = store_hnsw_ef_search"
    )
    # How a model's HNSW index is built when the store creates it (its first registration, or `store copy`).
    # A denser graph (m 32, ef_construction 128) keeps recall@1 near 1 among millions of similar faces, at
    # about twice the index size and build time (docs/benchmarks.md, "What fixes recall").
    store_hnsw_m: int = Field(16, ge=2, le=100, description="HNSW graph degree of a new index")
    store_hnsw_ef_construction: int = Field(64, ge=4, le=1000, description="HNSW build candidate list")

    @field_validator("store_url", mode="before")
    @classmethod
    def _empty_url_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    # --- serving -------------------------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")
    # TensorFlow's intra-op pool per model call (pinned: on 2 shared cores larger pools oversubscribe).
    inference_threads: int = Field(2, ge=1)
    # Requests whose CPU work (decode, detect, the model calls) runs at once; more than the cores, so that a
    # batch can gather the faces of several requests while others decode and detect. The rest wait in a queue.
    inference_concurrency: int = Field(8, ge=1, description="Requests doing inference at once per worker")
    # Requests waiting for their turn beyond those running; one more is refused with 503 OVERLOADED and
    # Retry-After instead of waiting past its deadline (bounded work, quick answers under a burst).
    max_queued_requests: int = Field(32, ge=0, description="Queued inference requests per worker before 503")
    inference_timeout_s: float = 30.0
    # Dynamic batching across requests (api.services.batching): at most this many faces per model call
    # (1 = off), and the longest the first face of a batch waits for the faces of requests already in flight.
    batch_max_faces: int = Field(8, ge=1, description="Faces per model call across requests; 1 = no batching")
    batch_max_wait_ms: float = Field(5.0, ge=0.0, le=100.0, description="Longest wait for a batch to fill")
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_files_per_request: int = 10
    demo: bool | None = Field(
        None, description="Serve the demo page at /demo; None = in development and test, not in production"
    )

    # --- access and data safety --------------------------------------------------------------------
    # JSON list, e.g. FACE_API_KEYS='[{"name": "app", "scope": "client", "sha256": "..."}]'. With none, the
    # service answers only clients on a loopback address.
    api_keys: list[ApiKeyEntry] = Field(default_factory=list)
    # Off by default: a frontend behind one proxy address must not be capped. An operator's choice, for all
    # callers (e.g. "600/minute": per key, or per client address when open) or per key (ApiKeyEntry.rate_limit).
    rate_limit: str | None = Field(None, description="Requests per caller, e.g. 600/minute; unset = no limit")
    # Failed authentications (401) per client address before that address gets 429s: against key guessing.
    auth_failure_limit: str | None = Field("20/minute", description="401 answers per client address; unset = off")
    audit_log_path: Path | None = REPO_ROOT / "audit.log"
    # Fernet key (32 url-safe base64 bytes) to encrypt the store at rest; see `python -m api.keys store-key`.
    store_encryption_key: str | None = Field(None, repr=False)

    # --- emotion and liveness ------------------------------------------------------------------------
    emotion_model: str = Field("ours", description="ours, fer (mini-Xception baseline) or deepface")
    emotion_tta: Literal["flip", "multicrop"] = Field(
        "flip", description="test-time views our emotion model averages: flip (2 passes) or multicrop (14)"
    )
    liveness_threshold: float = Field(0.5, ge=0.0, le=1.0)
    require_liveness: bool = False
