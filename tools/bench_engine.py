"""Latency and memory of the face engine beside deepface's and native dlib's pipelines, in one run.

One real photo, exactly 1000x800 (a deepface test photo from ../shared, or skimage's astronaut when that folder
is absent), JPEG-encoded once. Every measurement runs once per round and rounds are interleaved (order shuffled
per round), so that the noise of a shared machine hits all pipelines alike; medians and ratios come from the
same run. Per-face figures divide a batch call's time by its number of faces. Each measurement also records the
process CPU time (all threads), which a busy machine inflates far less than wall time.

Measured:

* ours: decode, detect (YuNet, on both of its runtimes: ONNX Runtime and libfacedetection itself), align
  (similarity warp), embed at batch 1 and 8 with and without flip TTA,
  and end to end (decode, then ``FaceEngine.represent``: detect, pick the largest face, align, embed); detection
  and end to end also with the detector working on a 320 px copy instead of the configured 640 px, for comparison.
* deepface: ``DeepFace.represent(path, model_name="Dlib", detector_backend="opencv")``, weights seeded by
  ``tools.eval_lfw.deepface_pipeline``.
* dlib: HOG detector, 5-point shape + ``get_face_chip``, ``compute_face_descriptor`` per chip and as one batch
  call, and end to end (the models and chip of ``tools.eval_lfw.load_dlib`` and ``dlib_chip``).
* memory: peak RSS (``ru_maxrss``) of this process, and of the engine alone in a fresh subprocess (no deepface or
  dlib loaded there).

Examples::

    python -m tools.bench_engine --rounds 30 --json reports/bench/engine.json --markdown reports/bench/engine.md
    python -m tools.bench_engine --threads-sweep 1 2      # the engine alone with TF intra-op 1 vs 2 threads
    python -m tools.bench_engine --threads-sweep 2 --sweep-bf16   # ... and with oneDNN bfloat16 (AMX) as well
    python -m tools.bench_engine --runtimes --rounds 30   # every network on TensorFlow vs ONNX Runtime
    python -m tools.bench_engine --reduced-decoding --rounds 10   # reduced vs full-size JPEG decoding
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from api.config import Settings
from api.services.imaging import decode_image
from tools.common import FACEDATA, REPO_ROOT

WIDTH, HEIGHT = 1000, 800
BATCH = 8
SMALL_DETECT_SIDE = 320  # an alternative detection size, timed beside the configured one
DEFAULT_PHOTO = FACEDATA / "identity" / "deepface" / "img22.jpg"

# Targets from the issue.
TARGET_EMBED_MS = 8.0  # Keras embedder, batch 8, per face
TARGET_EMBED_VS_DLIB = 5.0
TARGET_E2E_MS = 50.0  # one 1000x800 photo, end to end
TARGET_E2E_VS_DEEPFACE = 10.0
TARGET_ENGINE_RSS_MB = 1536.0


# --- the photo -----------------------------------------------------------------------------------------
def make_photo(source: Path | None) -> tuple[np.ndarray, bytes, str]:
    """An exactly WIDTHxHEIGHT RGB photo (scaled to cover, centre-cropped) and its JPEG bytes (quality 90)."""
    import cv2
    from PIL import Image

    if source is not None and source.is_file():
        rgb = decode_image(source.read_bytes())
        origin = f"{source.name} from ../shared/facedata ({rgb.shape[1]}x{rgb.shape[0]})"
    else:
        from skimage import data

        rgb = data.astronaut()
        origin = "skimage.data.astronaut() (512x512; ../shared is absent)"
    height, width = rgb.shape[:2]
    scale = max(WIDTH / width, HEIGHT / height)
    size = (max(WIDTH, round(width * scale)), max(HEIGHT, round(height * scale)))
    if size != (width, height):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        rgb = cv2.resize(rgb, size, interpolation=interpolation)
    top, left = (rgb.shape[0] - HEIGHT) // 2, (rgb.shape[1] - WIDTH) // 2
    rgb = np.ascontiguousarray(rgb[top : top + HEIGHT, left : left + WIDTH])
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    photo = decode_image(jpeg)
    return photo, jpeg, f"{origin}, scaled to cover and centre-cropped to {WIDTH}x{HEIGHT}, JPEG q90"


# --- timing --------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    name: str
    call: Callable[[], object]
    faces: int = 1  # the time of one call is divided by this (per-face figures of batch calls)
    samples: list[float] = field(default_factory=list)  # wall milliseconds (per face where faces > 1)
    cpu: list[float] = field(default_factory=list)  # process CPU milliseconds, all threads (same division)

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    def summary(self) -> dict[str, float | int]:
        values = np.asarray(self.samples)
        return {
            "median_ms": round(float(np.median(values)), 3),
            "p25_ms": round(float(np.percentile(values, 25)), 3),
            "p75_ms": round(float(np.percentile(values, 75)), 3),
            "min_ms": round(float(values.min()), 3),
            "cpu_median_ms": round(float(np.median(self.cpu)), 3),
            "n": len(values),
            "faces_per_call": self.faces,
        }


def run_rounds(measurements: list[Measurement], rounds: int, warmup: int = 2, seed: int = 0) -> None:
    """Every measurement once per round, in a shuffled order, after ``warmup`` untimed rounds."""
    rng = random.Random(seed)
    for _ in range(warmup):
        for m in measurements:
            m.call()
    for number in range(rounds):
        order = list(measurements)
        rng.shuffle(order)
        for m in order:
            cpu_started, started = time.process_time(), time.perf_counter()
            m.call()
            m.samples.append((time.perf_counter() - started) * 1000.0 / m.faces)
            m.cpu.append((time.process_time() - cpu_started) * 1000.0 / m.faces)
        if (number + 1) % 10 == 0:
            print(f"  round {number + 1}/{rounds}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def thread_settings() -> dict[str, Any]:
    """The pools in use; TensorFlow's only where it is loaded already (importing it here would add ~640 MB to
    the peak RSS this tool reports for the ONNX-runtime engine)."""
    settings: dict[str, Any] = {
        var: os.environ.get(var) for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_ENABLE_ONEDNN_OPTS")
    }
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        settings["tf_intra_op"] = tf.config.threading.get_intra_op_parallelism_threads()
        settings["tf_inter_op"] = tf.config.threading.get_inter_op_parallelism_threads()
    return settings


# --- pipelines -----------------------------------------------------------------------------------------
def enable_onednn_bf16() -> None:
    """Let TF's graph optimiser run oneDNN ops in bfloat16 where the CPU has it (AVX512-BF16 / AMX): an experiment."""
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})


def ours_measurements(jpeg: bytes, photo: np.ndarray, threads: int | None = None) -> tuple[list[Measurement], Any]:
    from api.services.detection import YuNetDetector
    from api.services.embedding import KerasDlibEmbedder
    from api.services.engine import FaceEngine, build_engine

    settings = Settings() if threads is None else Settings(inference_threads=threads)
    engine = build_engine(settings)
    engine.warm_up()
    embedder = engine.embedder
    if not isinstance(embedder, KerasDlibEmbedder):
        raise SystemExit(f"The benchmark times the Keras embedder; FACE_EMBEDDER selects {type(embedder).__name__}.")
    face = engine.represent(photo).face  # the largest face, as the service picks it
    chip = engine.align(photo, [face])
    chips = np.repeat(chip, BATCH, axis=0)  # content does not change a CNN's cost

    @contextmanager
    def flip_set(flip: bool) -> Iterator[None]:
        """The embedder with flip TTA on or off for one call, then as configured again."""
        configured, embedder.flip = embedder.flip, flip
        try:
            yield
        finally:
            embedder.flip = configured

    def embed(batch: np.ndarray, flip: bool) -> Callable[[], object]:
        def call() -> object:
            with flip_set(flip):
                return embedder.embed(batch)

        return call

    # The same engine with detection on a smaller copy of the photo: what FACE_DETECT_MAX_SIDE would buy.
    small_side = SMALL_DETECT_SIDE
    small_detector = YuNetDetector(settings.detection_confidence, small_side, min(small_side, settings.detect_min_side))
    small_engine = FaceEngine(small_detector, embedder, settings.min_face_size)
    # The other YuNet runtime with the same sizes: libfacedetection itself against its network in ONNX Runtime.
    other_runtime = "library" if settings.detector_runtime == "onnx" else "onnx"
    other_detector = YuNetDetector(
        settings.detection_confidence,
        settings.detect_max_side,
        settings.detect_min_side,
        settings.detect_first_pass_side,
        runtime=other_runtime,
    )

    def end_to_end(flip: bool, using: FaceEngine = engine) -> Callable[[], object]:
        def call() -> object:
            with flip_set(flip):
                return using.represent(decode_image(jpeg)).embedding

        return call

    measurements = [
        Measurement("ours decode", lambda: decode_image(jpeg)),
        Measurement(
            f"ours detect (YuNet {settings.detector_runtime}, max side {settings.detect_max_side})",
            lambda: engine.detect(photo),
        ),
        Measurement(
            f"ours detect (YuNet {other_runtime}, max side {settings.detect_max_side})",
            lambda: other_detector.detect(photo),
        ),
        Measurement(f"ours detect (YuNet, max side {small_side})", lambda: small_detector.detect(photo)),
        Measurement("ours align (1 face)", lambda: engine.align(photo, [face])),
        Measurement("ours embed batch 1, flip", embed(chip, True)),
        Measurement("ours embed batch 1, no flip", embed(chip, False)),
        Measurement(f"ours embed batch {BATCH}, flip", embed(chips, True), BATCH),
        Measurement(f"ours embed batch {BATCH}, no flip", embed(chips, False), BATCH),
        Measurement("ours end to end, flip (default)", end_to_end(True)),
        Measurement("ours end to end, no flip", end_to_end(False)),
        Measurement(f"ours end to end, flip, detect max side {small_side}", end_to_end(True, small_engine)),
    ]
    return measurements, engine


def deepface_measurements(photo_path: Path) -> tuple[list[Measurement], np.ndarray]:
    from tools.eval_lfw import deepface_pipeline

    represent = deepface_pipeline("largest")  # seeds the weights into reports/deepface_home
    vector = represent(photo_path)
    if vector is None:
        raise SystemExit("deepface found no face in the benchmark photo.")
    from deepface import DeepFace

    def call() -> object:
        return DeepFace.represent(str(photo_path), model_name="Dlib", detector_backend="opencv")

    return [Measurement("deepface represent (end to end)", call)], vector


def dlib_measurements(jpeg: bytes, photo: np.ndarray) -> tuple[list[Measurement], np.ndarray]:
    from tools.eval_lfw import dlib_chip, load_dlib

    detector, predictor, model = load_dlib()
    rects = list(detector(photo, 0))
    if not rects:
        raise SystemExit("dlib's HOG detector found no face in the benchmark photo.")
    rect = max(rects, key=lambda r: r.area())
    chip = dlib_chip(photo, predictor, rect)
    chips = [chip] * BATCH

    def end_to_end() -> np.ndarray:
        image = decode_image(jpeg)
        largest = max(detector(image, 0), key=lambda r: r.area())
        return np.asarray(model.compute_face_descriptor(dlib_chip(image, predictor, largest)), np.float32)

    measurements = [
        Measurement("dlib detect (HOG, no upsampling)", lambda: detector(photo, 0)),
        Measurement("dlib detect (HOG, upsample 1)", lambda: detector(photo, 1)),
        Measurement("dlib align (5 points + get_face_chip)", lambda: dlib_chip(photo, predictor, rect)),
        Measurement("dlib embed batch 1", lambda: model.compute_face_descriptor(chip)),
        Measurement(f"dlib embed batch {BATCH} (one call)", lambda: model.compute_face_descriptor(chips), BATCH),
        Measurement("dlib end to end", end_to_end),
    ]
    vector = end_to_end()
    return measurements, vector / np.linalg.norm(vector)


# --- the engine alone, in a subprocess -----------------------------------------------------------------
def engine_only(args: argparse.Namespace) -> None:
    """Child mode: build the engine, time its stages, print one JSON line with samples and peak RSS."""
    photo, jpeg, _ = make_photo(None if args.photo == "astronaut" else Path(args.photo))
    baseline = current_rss_mb()
    if args.bf16:
        enable_onednn_bf16()
    measurements, engine = ours_measurements(jpeg, photo, args.threads)
    after_build = current_rss_mb()
    embedding = engine.represent(photo).embedding
    run_rounds(measurements, args.rounds)
    payload = {
        "threads": thread_settings(),
        "rss_before_engine_mb": round(baseline, 1),
        "rss_after_build_mb": round(after_build, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "samples": {m.name: m.samples for m in measurements},
        "cpu_samples": {m.name: m.cpu for m in measurements},
        "embedding": [float(v) for v in embedding],
    }
    print("ENGINE_JSON " + json.dumps(payload), flush=True)


def run_engine_subprocess(photo: str, rounds: int, threads: int | None, bf16: bool = False) -> dict[str, Any]:
    command = [sys.executable, "-m", "tools.bench_engine", "--engine-only", "--rounds", str(rounds), "--photo", photo]
    if threads is not None:
        command += ["--threads", str(threads)]
    if bf16:
        command.append("--bf16")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("ENGINE_JSON "):
            return json.loads(line.removeprefix("ENGINE_JSON "))
    raise SystemExit(f"The engine subprocess failed ({result.returncode}):\n{result.stderr[-3000:]}")


# --- report --------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def compare(args: argparse.Namespace) -> dict[str, Any]:
    photo, jpeg, origin = make_photo(None if args.photo == "astronaut" else Path(args.photo))
    print(f"photo: {origin}", file=sys.stderr)

    print("engine alone in a fresh subprocess (peak RSS) ...", file=sys.stderr, flush=True)
    engine_alone = run_engine_subprocess(args.photo, args.engine_rounds, None)

    with tempfile.TemporaryDirectory() as folder:
        photo_path = Path(folder) / f"bench_{WIDTH}x{HEIGHT}.jpg"
        photo_path.write_bytes(jpeg)
        ours, engine = ours_measurements(jpeg, photo)
        rss_ours = current_rss_mb()
        deepface, deepface_vector = deepface_measurements(photo_path)
        dlib_ms, dlib_vector = dlib_measurements(jpeg, photo)
        ours_vector = engine.represent(photo).embedding
        measurements = ours + deepface + dlib_ms
        print(f"{len(measurements)} measurements x {args.rounds} interleaved rounds ...", file=sys.stderr, flush=True)
        run_rounds(measurements, args.rounds)
    by_name = {m.name: m for m in measurements}

    def row(
        what: str, unit: str, wall: float, cpu: float, target: str | None, meets: Callable[[float], bool]
    ) -> dict[str, Any]:
        """One comparison: the wall-clock and CPU-time figures, and whether each meets the target."""
        return {
            "what": what,
            "unit": unit,
            "wall": round(wall, 3),
            "cpu": round(cpu, 3),
            "target": target or "(info)",
            "met": None if target is None else meets(wall),
            "met_by_cpu": None if target is None else meets(cpu),
        }

    def at_most(what: str, name: str, limit: float | None) -> dict[str, Any]:
        m = by_name[name]
        target = None if limit is None else f"<= {limit:g} ms"
        return row(what, "ms", m.median, float(np.median(m.cpu)), target, lambda v: v <= limit)

    def times_faster(what: str, slow: str, fast: str, factor: float | None) -> dict[str, Any]:
        a, b = by_name[slow], by_name[fast]
        wall, cpu = a.median / b.median, float(np.median(a.cpu) / np.median(b.cpu))
        target = None if factor is None else f">= {factor:g}x"
        return row(what, "x", wall, cpu, target, lambda v: v >= factor)

    keras_b8, keras_b8_flip = f"ours embed batch {BATCH}, no flip", f"ours embed batch {BATCH}, flip"
    e2e, e2e_noflip = "ours end to end, flip (default)", "ours end to end, no flip"
    e2e_small = f"ours end to end, flip, detect max side {SMALL_DETECT_SIDE}"
    engine_rss = engine_alone["peak_rss_mb"]
    comparisons = [
        at_most("Keras embed batch 8 per face, no flip", keras_b8, TARGET_EMBED_MS),
        at_most("Keras embed batch 8 per face, flip", keras_b8_flip, TARGET_EMBED_MS),
        times_faster("dlib per face / Keras batch 8 no flip", "dlib embed batch 1", keras_b8, TARGET_EMBED_VS_DLIB),
        times_faster("dlib per face / Keras batch 8 flip", "dlib embed batch 1", keras_b8_flip, TARGET_EMBED_VS_DLIB),
        times_faster(
            "dlib batch-8 call / Keras batch 8 no flip", f"dlib embed batch {BATCH} (one call)", keras_b8, None
        ),
        at_most("end to end, flip (default)", e2e, TARGET_E2E_MS),
        at_most("end to end, no flip", e2e_noflip, TARGET_E2E_MS),
        at_most(f"end to end, flip, detect max side {SMALL_DETECT_SIDE}", e2e_small, TARGET_E2E_MS),
        times_faster(
            "deepface represent / ours end to end (flip)",
            "deepface represent (end to end)",
            e2e,
            TARGET_E2E_VS_DEEPFACE,
        ),
        times_faster("dlib end to end / ours end to end (flip)", "dlib end to end", e2e, None),
        {
            "what": "peak RSS, engine alone",
            "unit": "MB",
            "wall": engine_rss,
            "cpu": None,
            "target": f"<= {TARGET_ENGINE_RSS_MB:g} MB",
            "met": engine_rss <= TARGET_ENGINE_RSS_MB,
            "met_by_cpu": None,
        },
    ]
    result = {
        "photo": origin,
        "rounds": args.rounds,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "threads": thread_settings(),
        "measurements": {m.name: m.summary() for m in measurements},
        "comparisons": comparisons,
        "agreement_cosine": {
            "ours_vs_dlib": round(float(ours_vector @ dlib_vector), 4),
            "ours_vs_deepface": round(float(ours_vector @ deepface_vector), 4),
            "deepface_vs_dlib": round(float(deepface_vector @ dlib_vector), 4),
        },
        "memory_mb": {
            "engine_alone_peak_rss": engine_rss,
            "engine_alone_rss_before_engine": engine_alone["rss_before_engine_mb"],
            "engine_alone_rss_after_build": engine_alone["rss_after_build_mb"],
            "this_process_rss_after_engine": round(rss_ours, 1),
            "this_process_peak_rss (engine + deepface + dlib)": round(peak_rss_mb(), 1),
        },
        "engine_alone_medians_ms": {
            name: round(float(np.median(values)), 3) for name, values in engine_alone["samples"].items()
        },
    }
    return result


def threads_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """The engine alone per TF setting (intra-op threads, optionally bf16), alternated and pooled over repeats."""
    variants = [(t, False) for t in args.threads_sweep]
    if args.sweep_bf16:
        variants += [(t, True) for t in args.threads_sweep]
    label = {v: f"intra-op {v[0]}" + (", oneDNN bf16" if v[1] else "") for v in variants}
    pooled: dict[tuple[int, bool], dict[str, dict[str, list[float]]]] = {v: {"wall": {}, "cpu": {}} for v in variants}
    peaks: dict[tuple[int, bool], list[float]] = {v: [] for v in variants}
    embeddings: dict[tuple[int, bool], np.ndarray] = {}
    for repeat in range(args.sweep_repeats):
        for variant in variants:
            print(f"sweep: {label[variant]} (repeat {repeat + 1})", file=sys.stderr, flush=True)
            child = run_engine_subprocess(args.photo, args.sweep_rounds, *variant)
            peaks[variant].append(child["peak_rss_mb"])
            embeddings[variant] = np.asarray(child["embedding"], np.float32)
            for kind, key in (("wall", "samples"), ("cpu", "cpu_samples")):
                for name, values in child[key].items():
                    pooled[variant][kind].setdefault(name, []).extend(values)
    return {
        "rounds_per_setting": args.sweep_rounds * args.sweep_repeats,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "settings": {
            label[variant]: {
                "peak_rss_mb": max(peaks[variant]),
                "cosine_to_fp32": round(float(embeddings[variant] @ embeddings[(variant[0], False)]), 6),
                **{
                    kind: {name: round(float(np.median(v)), 3) for name, v in samples.items()}
                    for kind, samples in pooled[variant].items()
                },
            }
            for variant in variants
        },
    }


RUNTIME_MODELS = {  # network: (Keras file relative to the repository, input shape)
    "dlib ResNet (embedder)": ("face_embedding_model.keras", (150, 150, 3)),
    "FaceNet (fused embedder)": ("facenet_embedding_model.keras", (160, 160, 3)),
    "emotion CNN": ("resources/emotion_model.keras", (48, 48, 1)),
    "MiniFASNetV2 (anti-spoofing)": ("resources/anti_spoof_models/2.7_80x80_MiniFASNetV2.keras", (80, 80, 3)),
    "MiniFASNetV1SE (anti-spoofing)": ("resources/anti_spoof_models/4_0_0_80x80_MiniFASNetV1SE.keras", (80, 80, 3)),
}


def runtimes(args: argparse.Namespace) -> dict[str, Any]:
    """Every shipped network on both runtimes (``api.ml.runtime``), batch 1 and 8, interleaved rounds: the
    time of one call (batch 8: per row) and the largest difference between the two runtimes' outputs."""
    import api.ml.facenet  # noqa: F401  (FaceNet's custom layer, before its Keras file loads)
    from api.ml.runtime import KerasNetwork, OnnxNetwork, onnx_path_of

    rng = np.random.default_rng(0)
    measurements, agreement = [], {}
    for name, (relative, shape) in RUNTIME_MODELS.items():
        keras_path = REPO_ROOT / relative
        if not keras_path.is_file() or not onnx_path_of(keras_path).is_file():
            print(f"{relative} or its ONNX export is absent (make models): skipped", file=sys.stderr)
            continue
        networks = {"TensorFlow": KerasNetwork(keras_path, 2), "ONNX Runtime": OnnxNetwork(onnx_path_of(keras_path), 2)}
        batch = rng.uniform(0, 255, (8, *shape)).astype(np.float32)
        outputs = [np.asarray(network(batch), np.float64) for network in networks.values()]
        agreement[name] = float(np.abs(outputs[0] - outputs[1]).max())
        for runtime, network in networks.items():
            measurements.append(Measurement(f"{name}, {runtime}, batch 1", lambda n=network, b=batch: n(b[:1])))
            measurements.append(Measurement(f"{name}, {runtime}, batch 8", lambda n=network, b=batch: n(b), faces=8))
    run_rounds(measurements, args.rounds)
    return {
        "threads": 2,
        "rounds": args.rounds,
        "measurements": [{"name": m.name, **m.summary()} for m in measurements],
        "max_abs_difference": agreement,
    }


def reduced_decoding(args: argparse.Namespace) -> dict[str, Any]:
    """Reduced against full-size JPEG decoding on every photo of ../shared/facedata/identity whose longer side
    is 1,280 px or more: decode time, how often the reduced decode is kept, and how far the descriptor of the
    largest face moves (``RecognitionService.find_face`` with and without ``FACE_REDUCED_DECODING``)."""
    from PIL import Image

    from api.composition import load_models
    from api.errors import FaceServiceError
    from api.services.imaging import decode_reduced
    from api.services.recognition import ImageUpload

    def longer_side(path: Path) -> int:
        with Image.open(path) as image:
            return max(image.size)

    photos = [path for path in sorted((FACEDATA / "identity").glob("*/*.jpg")) if longer_side(path) >= 1280]
    services = {
        flag: load_models(Settings(reduced_decoding=flag, batch_max_faces=1)).recognition for flag in (False, True)
    }
    settings = Settings()
    side, max_pixels = services[True].engine.decode_min_side, settings.max_image_pixels
    rows, cosines, kept = [], [], 0
    for path in photos:
        data = path.read_bytes()
        times = {}
        for label, min_side in (("full", 0), ("reduced", side)):
            started = time.perf_counter()
            for _ in range(args.rounds):
                decode_reduced(data, max_pixels, min_side)
            times[label] = (time.perf_counter() - started) * 1000.0 / args.rounds
        descriptors = {}
        for flag, service in services.items():
            try:
                found = service.find_face(ImageUpload(path.name, data), "largest", False)
            except FaceServiceError as error:
                descriptors[flag] = error.code
                continue
            kept += flag and found.scale < 1.0
            descriptors[flag] = service._embed_found([found])[0]
        cosine = None
        if all(isinstance(d, np.ndarray) for d in descriptors.values()):
            cosine = float(descriptors[False] @ descriptors[True])
            cosines.append(cosine)
        rows.append(
            {
                "photo": path.name,
                "full_ms": round(times["full"], 2),
                "reduced_ms": round(times["reduced"], 2),
                "cosine": cosine,
            }
        )
    return {
        "photos": len(photos),
        "reduced_kept": kept,
        "median_cosine": float(np.median(cosines)) if cosines else None,
        "min_cosine": min(cosines) if cosines else None,
        "median_full_decode_ms": float(np.median([r["full_ms"] for r in rows])) if rows else None,
        "median_reduced_decode_ms": float(np.median([r["reduced_ms"] for r in rows])) if rows else None,
        "rows": rows,
    }


def runtimes_markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        f"Command: `{command}` (intra-op 2 threads on both runtimes; per row at batch 8)",
        "",
        "| network, runtime, batch | median ms | median CPU ms |",
        "|---|---|---|",
    ]
    lines += [f"| {m['name']} | {m['median_ms']} | {m['cpu_median_ms']} |" for m in result["measurements"]]
    lines += ["", "Largest difference between the runtimes' outputs (8 random inputs):", ""]
    lines += [f"* {name}: {value:.2e}" for name, value in result["max_abs_difference"].items()]
    return "\n".join(lines) + "\n"


def sweep_markdown(sweep: dict[str, Any], command: str) -> str:
    keys = list(sweep["settings"])
    names = list(sweep["settings"][keys[0]]["wall"])
    lines = [
        f"Command: `{command}`",
        "",
        f"The engine alone in fresh subprocesses, {sweep['rounds_per_setting']} rounds per setting (alternating "
        f"runs); median wall ms / median process CPU ms (all threads). Load average at the end "
        f"{sweep['load_average']}.",
        "",
        "| measurement | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name in names:
        cells = [f"{sweep['settings'][k]['wall'][name]:.1f} / {sweep['settings'][k]['cpu'][name]:.1f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| peak RSS (MB) | " + " | ".join(f"{sweep['settings'][k]['peak_rss_mb']:.0f}" for k in keys) + " |")
    lines.append(
        "| descriptor cosine to fp32 (same threads) | "
        + " | ".join(f"{sweep['settings'][k]['cosine_to_fp32']:.6f}" for k in keys)
        + " |"
    )
    return "\n".join(lines) + "\n"


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        f"Photo: {result['photo']}. {result['rounds']} interleaved rounds; medians (p25-p75) in ms; per-face "
        f"figures divide a batch call by its size. Machine: {result['machine']['cpus']} CPUs "
        f"(load average at the end {result['machine']['load_average']}), Python {result['machine']['python']}; "
        f"TF intra-op {result['threads'].get('tf_intra_op', '-')}, "
        f"inter-op {result['threads'].get('tf_inter_op', '-')}, "
        f"OMP_NUM_THREADS={result['threads']['OMP_NUM_THREADS']}.",
        "",
        "| measurement | median ms | p25-p75 ms | median CPU ms |",
        "|---|---|---|---|",
    ]
    for name, s in result["measurements"].items():
        per = " (per face)" if s["faces_per_call"] > 1 else ""
        lines.append(
            f"| {name}{per} | {s['median_ms']:.1f} | {s['p25_ms']:.1f}-{s['p75_ms']:.1f} | {s['cpu_median_ms']:.1f} |"
        )
    lines += [
        "",
        "| comparison (same run) | wall (medians) | CPU (medians) | target | by wall | by CPU |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["comparisons"]:
        cells = [
            f"{v:.1f}{c['unit'] if c['unit'] == 'x' else ''}" if v is not None else "" for v in (c["wall"], c["cpu"])
        ]
        met = ["" if v is None else verdict(bool(v)) for v in (c["met"], c["met_by_cpu"])]
        lines.append(f"| {c['what']} ({c['unit']}) | {cells[0]} | {cells[1]} | {c['target']} | {met[0]} | {met[1]} |")
    memory = result["memory_mb"]
    lines += [
        "",
        "| memory | MB |",
        "|---|---|",
        *(f"| {name.replace('_', ' ')} | {value:.0f} |" for name, value in memory.items()),
        "",
        "Agreement of the three descriptors of the photo's face (cosine): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in result["agreement_cosine"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timed rounds (default 30)")
    parser.add_argument("--engine-rounds", type=int, default=20, help="rounds of the engine-alone subprocess")
    parser.add_argument("--photo", default=str(DEFAULT_PHOTO), help="source photo, or 'astronaut'")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the tables as Markdown here")
    parser.add_argument(
        "--threads-sweep",
        type=int,
        nargs="*",
        default=[],
        help="only compare the engine alone at these TF intra-op values",
    )
    parser.add_argument("--sweep-rounds", type=int, default=20)
    parser.add_argument("--sweep-repeats", type=int, default=2)
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-bf16", action="store_true", help="also time each setting with oneDNN bfloat16")
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--runtimes", action="store_true", help="every network on TensorFlow and on ONNX Runtime, batch 1 and 8"
    )
    parser.add_argument(
        "--reduced-decoding", action="store_true", help="reduced vs full-size JPEG decoding on ../shared's large photos"
    )
    args = parser.parse_args()
    if args.photo != "astronaut" and not Path(args.photo).is_file():
        print(f"{args.photo} is absent: using skimage's astronaut instead.", file=sys.stderr)
        args.photo = "astronaut"
    if args.engine_only:
        engine_only(args)
        return
    command = "python -m tools.bench_engine " + " ".join(sys.argv[1:])
    if args.reduced_decoding:
        result = reduced_decoding(args)
        text = json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2) + "\n"
    elif args.runtimes:
        result = runtimes(args)
        text = runtimes_markdown(result, command)
    elif args.threads_sweep:
        result = threads_sweep(args)
        text = sweep_markdown(result, command)
    else:
        result = compare(args)
        text = markdown(result, command)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
