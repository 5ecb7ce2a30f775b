"""Helpers shared by the test modules: the error envelope check, image encoding, media types."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import httpx
    import numpy as np

JPEG = "image/jpeg"
ERROR_KEYS = {"code", "message", "details"}


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error body, after checking the status, the envelope ``{"error": {"code", "message", "details"}}``
    and the code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message"} <= set(error) <= ERROR_KEYS, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error.get("details", {}), dict), error
    return error


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a /metrics page (0 when absent), read with prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return 0.0


def jpeg_bytes(image: np.ndarray, quality: int = 92) -> bytes:
    """``image`` (H, W, 3 uint8 RGB) encoded as JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def wait_for_server(process: Any, url: str, log: Callable[[], str], timeout_s: float = 180.0) -> None:
    """Until ``url`` answers 200, failing the test at once if the server process exits or when it takes too
    long (with the end of its log either way)."""
    import httpx
    import pytest

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log()[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer 200 within {timeout_s:.0f} s:\n{log()[-3000:]}")
        time.sleep(0.25)


def report_line(request: Any, line: str) -> None:
    """Show ``line`` in pytest's terminal report even with output captured (test figures worth keeping)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def deepface_people_similarities(engine: Any, shared_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two photos each of five people of deepface's test set (``identity/deepface``), embedded by ``engine``
    (largest face): their similarity matrix and which pairs show the same person (the diagonal excluded)."""
    import json

    import numpy as np

    from api.services.imaging import decode_image

    folder = shared_dir / "identity" / "deepface"
    clusters = json.loads((folder / "clusters_derived.json").read_text())
    owners, embeddings = [], []
    for person in ["id01", "id02", "id03", "id05", "id10"]:
        for name in clusters[person][:2]:
            embeddings.append(engine.represent(decode_image((folder / name).read_bytes()), "largest").embedding)
            owners.append(person)
    similarity = np.stack(embeddings) @ np.stack(embeddings).T
    same = np.array(owners)[:, None] == np.array(owners)[None, :]
    return similarity, same & ~np.eye(len(owners), dtype=bool)
