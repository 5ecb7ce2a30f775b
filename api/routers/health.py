"""Service status, liveness and readiness probes."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api import __version__
from api.deps import StateDep
from api.schemas.health import Probe, ServiceStatus

router = APIRouter(tags=["health"])


@router.get("/", response_model=ServiceStatus, summary="Status, version, readiness, users and models")
async def root(state: StateDep) -> ServiceStatus:
    users = state.store.count()
    names = state.models.names if state.models is not None else {}
    return ServiceStatus(status="ok", version=__version__, ready=state.ready, users=users, models=names)


@router.get("/health/live", response_model=Probe, summary="The process answers (never touches the models)")
async def live() -> Probe:
    return Probe(status="ok")


@router.get(
    "/health/ready",
    response_model=Probe,
    summary="Models loaded and warmed",
    responses={503: {"model": Probe, "description": "Still loading, or loading failed"}},
)
async def ready(state: StateDep) -> Probe | JSONResponse:
    if state.ready:
        return Probe(status="ok")
    return JSONResponse({"status": "failed" if state.load_error else "loading"}, status_code=503)
