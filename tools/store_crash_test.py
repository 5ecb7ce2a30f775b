"""Crash test of the face store: kill a writer with SIGKILL at random moments, check nothing is lost.

Works on both backends: an ``.npz`` file, or a PostgreSQL database (``--store postgresql://...``).
Each round starts a writer process that registers users, adds faces and deletes users on one store
in a loop, announcing each operation before it starts (``BEGIN``) and after the store acknowledged it
(``ACK``). The writer is killed with SIGKILL after a random delay; the store is then loaded by a fresh
process-local instance and compared with the acknowledged operations: every acknowledged registration,
face addition and deletion must be there exactly (names and descriptor values), the one operation in
flight at the kill may or may not be, and nothing else may be.

    python -m tools.store_crash_test --kills 50                      # a fresh .npz; exit 1 on any loss
    python -m tools.store_crash_test --kills 50 --store postgresql://...   # an empty PostgreSQL database
    python -m tools.store_crash_test writer LOCATION TAG             # the writer itself (loop and tests)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from api.config import REPO_ROOT
from api.store import FaceStore, UserRecord, open_store_at

MODEL_ID = "crash-test-model"
DIM = 128


def faces_for(seed: int, count: int) -> np.ndarray:
    """The descriptors a writer stores for ``seed``: the verifier recomputes them to compare values."""
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


def run_writer(location: str, tag: str) -> None:
    """Write forever (until killed), printing BEGIN before and ACK after every store operation."""
    store = open_store_at(location)
    store.check()  # connect (PostgreSQL) before READY, so that kills land in writes, not in start-up
    rng = random.Random(f"{tag}-{os.getpid()}")
    own: list[str] = []  # users this writer registered: the only ones it changes, so rounds never collide
    out = sys.stdout

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()  # an ACK must reach the pipe before the next operation can be killed

    say("READY")
    i = 0
    while True:
        i += 1
        seed = rng.getrandbits(48)
        count = rng.randint(1, 3)
        roll = rng.random()
        if own and roll < 0.2:
            user_id = own.pop(rng.randrange(len(own)))
            say(f"BEGIN delete {user_id}")
            store.delete(user_id)
            say("ACK")
        elif own and roll < 0.4:
            user_id = rng.choice(own)
            say(f"BEGIN faces {user_id} {seed} {count}")
            store.add_faces(user_id, faces_for(seed, count), MODEL_ID)
            say("ACK")
        else:
            name = f"crash {tag}-{i} Zoë 测试"
            say(f"BEGIN add {seed} {count} {name}")
            record = store.add_user(name, faces_for(seed, count), MODEL_ID)
            own.append(record.id)
            say(f"ACK {record.id}")


@dataclass
class Expected:
    """Users as the acknowledged operations say they must be: id -> (name, [(seed, count), ...])."""

    users: dict[str, tuple[str, list[tuple[int, int]]]] = field(default_factory=dict)


@dataclass
class Report:
    kills: int = 0
    acknowledged: int = 0
    acknowledged_adds: int = 0
    acknowledged_face_additions: int = 0
    acknowledged_deletes: int = 0
    in_flight_applied: int = 0
    in_flight_not_applied: int = 0
    killed_mid_write: int = 0  # a temporary file was left behind: the kill hit between create and rename
    lost_or_wrong: int = 0
    unexplained_users: int = 0
    failed_loads: int = 0
    users_at_end: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost_or_wrong == 0 and self.unexplained_users == 0 and self.failed_loads == 0


def is_url(location: str) -> bool:
    return "://" in location


def writer_location(location: str, tag: str) -> str:
    """The writer's PostgreSQL connections carry its tag as application_name, so the checker can wait until
    the database has finished with a killed writer's session (a commit it had sent may still be running)."""
    if not is_url(location):
        return location
    return f"{location}{'&' if '?' in location else '?'}application_name=crash-writer-{tag}"


def writer_command(location: str, tag: str) -> list[str]:
    return [sys.executable, "-m", "tools.store_crash_test", "writer", writer_location(location, tag), tag]


def wait_for_sessions_to_end(location: str, tag: str, timeout_s: float = 30.0) -> None:
    if not is_url(location):
        return
    import psycopg

    deadline = time.monotonic() + timeout_s
    with psycopg.connect(location, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (f"crash-writer-{tag}",)
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            time.sleep(0.02)
    raise RuntimeError(f"the killed writer's database sessions did not end within {timeout_s:g} s")


def kill_one_writer(location: str, tag: str, max_delay_s: float, rng: random.Random) -> list[str]:
    """Start a writer, SIGKILL it after a random delay, return every line it printed."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(writer_command(location, tag), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline().decode("utf-8").strip()
    if first != "READY":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"writer did not start (said {first!r}, exit {proc.poll()})")
    time.sleep(rng.uniform(0.0, max_delay_s))
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read().decode("utf-8")  # what it printed before dying stays in the pipe
    proc.wait()
    wait_for_sessions_to_end(location, tag)
    return rest.splitlines()


def check_round(location: str, lines: list[str], expected: Expected, report: Report) -> None:
    """Apply the acknowledged operations to ``expected``, then compare with what the file holds."""
    pending: list[str] | None = None
    for line in lines:
        words = line.split(" ")
        if words[0] == "BEGIN":
            pending = words[1:]
        elif words[0] == "ACK" and pending is not None:
            _apply(expected, pending, words[1] if len(words) > 1 else None)
            report.acknowledged += 1
            kind = pending[0]
            report.acknowledged_adds += kind == "add"
            report.acknowledged_face_additions += kind == "faces"
            report.acknowledged_deletes += kind == "delete"
            pending = None

    if not is_url(location):
        path = Path(location)
        prefix = f".{path.name}."
        report.killed_mid_write += any(
            p.name.startswith(prefix) and p.name.endswith(".tmp") for p in path.parent.iterdir()
        )
    try:
        store = open_store_at(location)
    except Exception as exc:  # any failure to load after a kill is what this tool exists to find
        report.failed_loads += 1
        report.problems.append(f"load failed: {exc!r}")
        return
    records = {r.id: r for r in store.list_users()[0]}

    if pending is not None:  # the operation in flight at the kill: either outcome is correct
        applied = _in_flight_applied(store, records, expected, pending)
        if applied is not None:
            _apply(expected, pending, applied)
            report.in_flight_applied += 1
        else:
            report.in_flight_not_applied += 1

    for user_id, (name, blocks) in expected.users.items():
        record = records.get(user_id)
        want = np.concatenate([faces_for(seed, count) for seed, count in blocks])
        if record is None or record.name != name or not np.array_equal(store.embeddings_of(user_id), want):
            report.lost_or_wrong += 1
            report.problems.append(f"acknowledged user {user_id} missing or different")
    extra = set(records) - set(expected.users)
    report.unexplained_users += len(extra)
    report.problems.extend(f"unexplained user {user_id}" for user_id in sorted(extra))
    report.users_at_end = len(records)
    store.close()


def _apply(expected: Expected, op: list[str], acked_id: str | None) -> None:
    kind = op[0]
    if kind == "add":
        assert acked_id is not None
        seed, count, name = int(op[1]), int(op[2]), " ".join(op[3:])
        expected.users[acked_id] = (name, [(seed, count)])
    elif kind == "faces":
        expected.users[op[1]][1].append((int(op[2]), int(op[3])))
    elif kind == "delete":
        del expected.users[op[1]]


def _in_flight_applied(
    store: FaceStore, records: dict[str, UserRecord], expected: Expected, op: list[str]
) -> str | None:
    """Whether the unacknowledged operation reached the file; returns the id to record it under, else None."""
    kind = op[0]
    if kind == "add":
        name = " ".join(op[3:])
        new = [r.id for r in records.values() if r.name == name and r.id not in expected.users]
        return new[0] if len(new) == 1 else None
    if kind == "faces":
        record = records.get(op[1])
        known = sum(count for _, count in expected.users[op[1]][1])
        return op[1] if record is not None and record.faces == known + int(op[3]) else None
    if kind == "delete":
        return op[1] if op[1] not in records else None
    return None


def run(location: str, kills: int, max_delay_s: float, seed: int) -> Report:
    rng = random.Random(seed)
    expected = Expected()
    report = Report()
    started = time.perf_counter()
    for round_no in range(kills):
        lines = kill_one_writer(location, f"r{round_no}", max_delay_s, rng)
        report.kills += 1
        check_round(location, lines, expected, report)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["writer"]:
        run_writer(args[1], args[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--max-delay", type=float, default=0.3, help="seconds after start-up to kill within")
    parser.add_argument(
        "--store",
        "--path",
        dest="store",
        help="an .npz path or an empty PostgreSQL database's postgresql:// URL (default: a fresh .npz file)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    options = parser.parse_args(args)
    with tempfile.TemporaryDirectory(prefix="store-crash-") as tmp:
        location = options.store or str(Path(tmp) / "face_database.npz")
        report = run(location, options.kills, options.max_delay, options.seed)
    if options.json:
        print(json.dumps({**asdict(report), "ok": report.ok}, ensure_ascii=False, indent=2))
    else:
        for key, value in asdict(report).items():
            if key != "problems":
                print(f"{key.replace('_', ' ')}: {value}")
        for problem in report.problems[:20]:
            print(f"PROBLEM: {problem}")
        print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
