"""Throughput of bulk enrolment (``face-service enroll``) on LFW View 1's people, batched and one by one.

    python -m tools.bench_enroll                         # every LFW View 1 person (3,095 people, 4,992 photos)
    python -m tools.bench_enroll --naive-people 500      # + the first 500 people both ways, on fresh stores

The people folders are ``../shared/facedata/identity/lfw/images/<Name>/`` (already one folder per person, the
layout ``enroll`` reads). Every run writes into a fresh temporary ``.npz`` store with the service's default
settings otherwise; the models are loaded once, before any timing. "Naive" calls
``RecognitionService.register`` for one person after the other, which is what a script posting each folder to
``POST /api/register`` makes the service do. The machine is shared: the load average before and after each
run is printed with it, and a figure means little without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from tools.common import LFW


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people-dir", type=Path, default=LFW / "images", help="one sub-folder per person")
    parser.add_argument("--limit", type=int, default=None, help="only the first N people (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--naive-people", type=int, default=0, help="also enrol the first N people one by one and batched"
    )
    parser.add_argument("--skip-full", action="store_true", help="only the --naive-people comparison")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if not args.people_dir.is_dir():
        print(f"bench_enroll: {args.people_dir} is absent (development data lives in ../shared)", file=sys.stderr)
        return 2

    from api.composition import build_service
    from api.config import Settings
    from api.enrollment import EnrollOptions, StoreEnroller, scan_people
    from api.store import open_store_at

    people, _ = scan_people(args.people_dir)
    people = people[: args.limit] if args.limit else people
    scratch = Path(tempfile.mkdtemp(prefix="bench_enroll_"))
    settings = Settings(store_path=scratch / "warm-up.npz", store_url=None, audit_log_path=None)
    service = build_service(settings)  # loads and warms every model once
    recognition = service.models.recognition
    options = EnrollOptions(workers=args.workers, batch_size=args.batch_size)
    figures: dict[str, dict[str, float | int | str]] = {}

    def batched(label: str, subset: list) -> None:
        store = open_store_at(str(scratch / f"{label}.npz"), settings)
        load_before, cpu = _load(), time.process_time()
        result = StoreEnroller(recognition, store, options, settings.max_image_bytes).run(args.people_dir, subset)
        cpu = time.process_time() - cpu
        store.close()
        photos = result.accepted + result.rejected
        figures[label] = {
            "people": len(subset),
            "photos": photos,
            "registered": result.registered,
            "failed": result.failed,
            "seconds": round(result.seconds, 2),
            "photos_per_s": round(result.photos_per_second, 2),
            "cpu_ms_per_photo": round(1000 * cpu / max(photos, 1), 1),
            "load_before_after": f"{load_before} -> {_load()}",
        }
        print(f"{label}: {result.summary()}; CPU {cpu:.1f} s; load {figures[label]['load_before_after']}", flush=True)

    def naive(label: str, subset: list) -> None:
        from api.errors import FaceServiceError
        from api.services.recognition import ImageUpload, RegisterOptions

        store = open_store_at(str(scratch / f"{label}.npz"), settings)
        load_before, cpu, started = _load(), time.process_time(), time.monotonic()
        photos = registered = 0
        for person in subset:
            uploads = [ImageUpload(p.name, (args.people_dir / p).read_bytes()) for p in person.photos]
            photos += len(uploads)
            try:
                options = RegisterOptions(refuse_spoofs=settings.require_liveness)
                recognition.register(store, person.name, uploads, options)
                registered += 1
            except FaceServiceError:
                pass
        seconds, cpu = time.monotonic() - started, time.process_time() - cpu
        store.close()
        figures[label] = {
            "people": len(subset),
            "photos": photos,
            "registered": registered,
            "seconds": round(seconds, 2),
            "photos_per_s": round(photos / seconds, 2),
            "cpu_ms_per_photo": round(1000 * cpu / max(photos, 1), 1),
            "load_before_after": f"{load_before} -> {_load()}",
        }
        print(
            f"{label}: {registered} of {len(subset)} people registered, {photos} photos, {seconds:.1f} s, "
            f"{photos / seconds:.1f} photos/s; CPU {cpu:.1f} s; load {figures[label]['load_before_after']}",
            flush=True,
        )

    try:
        if args.naive_people:
            subset = people[: args.naive_people]
            naive(f"naive_{len(subset)}", subset)
            batched(f"batched_{len(subset)}", subset)
        if not args.skip_full:
            batched(f"batched_all_{len(people)}", people)
    finally:
        service.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"workers": args.workers, "batch_size": args.batch_size, **figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
