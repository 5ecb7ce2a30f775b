"""How near the machine's ceiling verify runs: a py-spy profile of the loaded service, the cost of each stage
alone, the embedder's arithmetic, and the ceiling they imply.

    python -m tools.profile_load --concurrency 16 --seconds 12 --json reports/profile.json

1. The service runs as ``make run`` serves it (one worker, default settings) with one registered person.
2. **Stage costs alone**: one client sends ``--requests`` verifies one at a time; the service's own
   ``/metrics`` histograms give each stage's mean time (decode, detect, align, embed, search) and the request's.
3. **Under load**: ``--concurrency`` clients send verifies while py-spy samples every thread of the server
   for ``--seconds``; samples are grouped by stage (by the frames on their stack) so the profile says what
   takes the CPU, and the CPU time of the server and of the load generator per request is read from /proc.
4. **Ceiling**: the embedder's multiply-adds per face (counted from the Keras model's layers) and the cores
   give the model's own bound; the sum of the stages' CPU per request gives the pipeline's. The report says
   how far the measured requests/s are from each.

The photo is deepface's ``img1.jpg`` (1137x910 in deepface's repository, 1184x1600 in ../shared), the one the
throughput issue measured, or scikit-image's astronaut without ``../shared``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tools.load_test import probe_photo, running_service
from tools.throughput import REFERENCE_PHOTO, drive, our_requests

STAGES = (
    ("decode", ("decode_reduced", "decode_image", "PIL/")),
    ("detect", ("detection.py",)),
    ("align", ("alignment.py",)),
    ("embed (ONNX Runtime)", ("onnxruntime",)),
    ("embed (other)", ("embedding.py", "batching.py")),
    ("search", ("store/",)),
    ("HTTP, parsing, routing", ("multipart", "starlette", "fastapi", "uvicorn", "h11", "pydantic", "middleware")),
)
IDLE_LEAVES = ("Condition.wait", "EpollSelector.select", "Event.wait", "select (selectors", "_worker (")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stage_means(metrics_before: str, metrics_after: str) -> dict[str, float]:
    """Mean milliseconds per call of every stage and of the verify request, between two /metrics pages."""

    def parse(text: str) -> dict[tuple[str, str], float]:
        pattern = r"^face_(?:model_stage|http_request)_duration_seconds_(sum|count)\{([^}]*)\} (\S+)"
        return {(m[2], m[1]): float(m[3]) for m in re.finditer(pattern, text, re.M)}

    before, after = parse(metrics_before), parse(metrics_after)
    means = {}
    for labels, kind in after:
        if kind != "count":
            continue
        count = after[(labels, "count")] - before.get((labels, "count"), 0.0)
        if count:
            total = after[(labels, "sum")] - before.get((labels, "sum"), 0.0)
            name = labels.split('"')[1] if labels.startswith("stage") else labels.split('route="')[1].rstrip('"')
            means[name] = round(1000 * total / count, 2)
    return {k: v for k, v in means.items() if k in {"decode", "detect", "align", "embed", "search", "/api/verify"}}


def batch_sizes(metrics_text: str) -> dict[str, dict[str, float]]:
    """Per batched model: model calls, mean rows per call, and the share of calls that held one row only."""
    per_model: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for kind, labels, value in re.findall(
        r"^face_model_batch_rows_(sum|count|bucket)\{([^}]*)\} (\S+)", metrics_text, re.M
    ):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = kind if kind != "bucket" else f"le {label['le']}"
        per_model[label["model"]][key] = float(value)
    sizes = {}
    for model, values in per_model.items():
        if values.get("count"):
            sizes[model] = {
                "calls": values["count"],
                "mean_rows": round(values["sum"] / values["count"], 2),
                "one_row_share": round(values.get("le 1.0", 0.0) / values["count"], 3),
            }
    return sizes


def batches_between(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict]:
    """The model calls made between two :func:`batch_sizes` readings: how many, and their mean rows."""
    between = {}
    for model, now in after.items():
        then = before.get(model, {"calls": 0.0, "mean_rows": 0.0, "one_row_share": 0.0})
        calls = now["calls"] - then["calls"]
        if calls > 0:
            rows = now["calls"] * now["mean_rows"] - then["calls"] * then["mean_rows"]
            single = now["calls"] * now["one_row_share"] - then["calls"] * then["one_row_share"]
            between[model] = {
                "calls": calls,
                "mean_rows": round(rows / calls, 2),
                "one_row_share": round(single / calls, 3),
            }
    return between


def profile(pid: int, seconds: int, out: Path) -> dict[str, float]:
    """py-spy's raw samples of every thread of ``pid``, grouped by stage: the share of busy samples each."""
    py_spy = str(Path(sys.executable).parent / "py-spy")
    subprocess.run(
        [py_spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "100", "-f", "raw", "-o", str(out)],
        check=True,
        capture_output=True,
    )
    shares: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or stack.rsplit(";", 1)[-1].startswith(IDLE_LEAVES):
            continue
        stage = next((name for name, marks in STAGES if any(mark in stack for mark in marks)), "other")
        shares[stage] += int(count)
    busy = sum(shares.values()) or 1
    return {name: round(100.0 * n / busy, 1) for name, n in shares.most_common()}


def embedder_multiply_adds() -> int:
    """Multiply-adds of one forward pass of the default embedder (dlib's ResNet, one 150x150 chip), counted
    from the convolution and dense layers of the Keras model."""
    import keras

    from api.config import Settings

    model = keras.saving.load_model(Settings().embedding_model_path, compile=False)
    total = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D", "Dense"):
            kernel = layer.get_weights()[0]
            output = layer.output.shape
            positions = int(output[1] * output[2]) if len(output) == 4 else 1
            total += positions * int(kernel.size)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=60, help="sequential verifies for the stage costs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    photo = REFERENCE_PHOTO.read_bytes() if REFERENCE_PHOTO.is_file() else probe_photo()
    verify = our_requests(photo)["verify"]
    report: dict = {"command": "python -m tools.profile_load " + " ".join(sys.argv[1:] if argv is None else argv)}
    with running_service(FACE_STORE_PATH=str(Path(tempfile.mkdtemp()) / "store.npz")) as (server, client, _):
        base = str(client.base_url)
        client.post("/api/register", data={"name": "probe"}, files=[("files", ("p.jpg", photo, "image/jpeg"))])
        drive(base, verify, 2, 10, "warm-up")
        before = client.get("/metrics").text
        alone = drive(base, verify, 1, args.requests, "verify")
        after_alone = client.get("/metrics").text
        report["alone"] = {"rps": alone.row()["rps"], "stage_ms": stage_means(before, after_alone)}
        batches_before = batch_sizes(after_alone)
        server_cpu, client_cpu = cpu_seconds(server.pid), cpu_seconds(os.getpid())
        loaded: dict = {}
        load_s = args.seconds + 3.0  # the profile starts 2 s in and must end before the load does

        def load() -> None:
            loaded["level"] = drive(base, verify, args.concurrency, 10**9, "verify", for_seconds=load_s)

        runner = threading.Thread(target=load)
        started = time.perf_counter()
        runner.start()
        time.sleep(2.0)
        with tempfile.TemporaryDirectory() as folder:
            report["profile_share_percent"] = profile(server.pid, args.seconds, Path(folder) / "raw.txt")
        runner.join()
        wall = time.perf_counter() - started
        report["batches_under_load"] = batches_between(batches_before, batch_sizes(client.get("/metrics").text))
        level = loaded["level"]
        served = level.statuses[200]
        report["loaded"] = {
            **level.row(),
            "server_cpu_ms_per_request": round(1000 * (cpu_seconds(server.pid) - server_cpu) / served, 1),
            "load_generator_cpu_ms_per_request": round(1000 * (cpu_seconds(os.getpid()) - client_cpu) / served, 1),
            "seconds": round(wall, 1),
        }
    cores = len(os.sched_getaffinity(0))
    macs = embedder_multiply_adds()
    stages = report["alone"]["stage_ms"]
    pipeline_ms = sum(stages.get(s, 0.0) for s in ("decode", "detect", "align", "embed", "search"))
    per_request_cpu = (
        report["loaded"]["server_cpu_ms_per_request"] + report["loaded"]["load_generator_cpu_ms_per_request"]
    )
    report["ceiling"] = {
        "cores": cores,
        "embedder_mmacs_per_pass": round(macs / 1e6, 1),
        "passes_per_request": 2,  # the face and its mirror image
        "stages_cpu_ms_per_request": round(pipeline_ms, 1),
        # multiply-adds of both passes over the embed stage's time alone: how near the CPU's peak the model runs
        "embedder_gmacs_per_s": round(2 * macs / 1e9 / (stages["embed"] / 1000), 1) if stages.get("embed") else None,
        "pipeline_bound_rps": round(cores * 1000 / pipeline_ms, 1),
        "measured_cpu_bound_rps": round(cores * 1000 / per_request_cpu, 1),
        "measured_rps": report["loaded"]["rps"],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
