"""Service status and the two probes: liveness (the process answers) and readiness (it can serve)."""

import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api import __version__
from api.deps import LoadingDep, StoreDep
from api.errors import FaceServiceError
from api.schemas.health import Probe, ServiceStatus

router = APIRouter(tags=["health"])


@router.get("/", response_model=ServiceStatus, summary="Status, version, readiness, users, store and models")
async def status(loading: LoadingDep, store: StoreDep) -> ServiceStatus:
    try:
        users: int | None = await anyio.to_thread.run_sync(store.count)
    except FaceServiceError:  # the database is away: say so through `ready`, not a 503 of the status page
        users = None
    names = loading.models.names if loading.models is not None else {}
    return ServiceStatus(
        status="ok", version=__version__, ready=loading.ready, users=users, store=store.backend, models=names
    )


@router.get(
    "/health/live",
    response_model=Probe,
    response_model_exclude_none=True,
    summary="Liveness probe: the process answers (never touches the models or the store)",
)
async def liveness_probe() -> Probe:
    return Probe(status="ok")


@router.get(
    "/health/ready",
    response_model=Probe,
    response_model_exclude_none=True,
    summary="Readiness probe: models loaded and warmed, and the store reachable",
    responses={503: {"model": Probe, "description": "Still loading, loading failed, or the store is unavailable"}},
)
async def readiness_probe(loading: LoadingDep, store: StoreDep) -> Probe | JSONResponse:
    if not loading.ready:
        return JSONResponse({"status": "failed" if loading.error else "loading"}, status_code=503)
    try:
        await anyio.to_thread.run_sync(store.check)
    except FaceServiceError as exc:
        return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
    return Probe(status="ok")
