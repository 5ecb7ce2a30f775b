"""Prometheus metrics of the whole server (every worker) at /metrics."""

import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import Response

from api.deps import AdminDep, StoreDep
from api.schemas.common import error_responses

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics: requests, latencies per route and model stage, queue depth, users, load time",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **error_responses(401, 403)},
)
async def metrics_page(_: AdminDep, store: StoreDep) -> Response:
    from api import metrics

    body, content_type = await anyio.to_thread.run_sync(metrics.render, store)
    return Response(body, media_type=content_type)
