"""Service status, liveness and readiness probes."""

import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api import __version__
from api.deps import StateDep
from api.errors import FaceServiceError
from api.schemas.health import Probe, ServiceStatus

router = APIRouter(tags=["health"])


@router.get("/", response_model=ServiceStatus, summary="Status, version, readiness, users, store and models")
async def root(state: StateDep) -> ServiceStatus:
    try:
        users: int | None = await anyio.to_thread.run_sync(state.store.count)
    except FaceServiceError:  # the database is away: say so through `ready`, not a 503 of the status page
        users = None
    names = state.models.names if state.models is not None else {}
    return ServiceStatus(
        status="ok", version=__version__, ready=state.ready, users=users, store=state.store.backend, models=names
    )


@router.get(
    "/health/live",
    response_model=Probe,
    response_model_exclude_none=True,
    summary="The process answers (never touches the models)",
)
async def live() -> Probe:
    return Probe(status="ok")


@router.get(
    "/health/ready",
    response_model=Probe,
    response_model_exclude_none=True,
    summary="Models loaded and warmed, and the store reachable",
    responses={503: {"model": Probe, "description": "Still loading, loading failed, or the store is unavailable"}},
)
async def ready(state: StateDep) -> Probe | JSONResponse:
    if not state.ready:
        return JSONResponse({"status": "failed" if state.load_error else "loading"}, status_code=503)
    try:
        await anyio.to_thread.run_sync(state.store.check)
    except FaceServiceError as exc:
        return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
    return Probe(status="ok")
