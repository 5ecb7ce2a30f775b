"""Create, list and delete collections: galleries that never see each other's users."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from api.deps import AdminDep, AuditedAdminDep, AuthenticatorDep, RunnerDep, StoreDep
from api.schemas.collections import Collection, CollectionCreate, CollectionDeleted
from api.schemas.common import error_responses
from api.store import CollectionInfo
from api.store.base import COLLECTION_NAME_PATTERN

router = APIRouter(prefix="/api/collections", tags=["collections"])

CollectionName = Annotated[str, Path(pattern=COLLECTION_NAME_PATTERN, description="The collection's name")]


def collection_of(info: CollectionInfo) -> Collection:
    return Collection(name=info.name, users=info.users, faces=info.faces, created_at=info.created_at)


@router.get("", response_model=list[Collection], summary="List collections", responses=error_responses(401, 403, 429))
async def list_collections(caller: AdminDep, store: StoreDep, runner: RunnerDep) -> list[Collection]:
    # A key bound to some collections sees only those.
    return [collection_of(c) for c in await runner.run(store.list_collections) if caller.may_use(c.name)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Collection,
    summary="Create a collection",
    responses=error_responses(401, 403, 409, 422, 429),
)
async def create_collection(
    admin: AuditedAdminDep,
    authenticator: AuthenticatorDep,
    store: StoreDep,
    runner: RunnerDep,
    body: CollectionCreate,
) -> Collection:
    authenticator.authorise_collection(admin.caller, body.name)
    info = await runner.run(store.create_collection, body.name)
    admin.record("create_collection", None, collection=body.name)
    return collection_of(info)


@router.get(
    "/{name}", response_model=Collection, summary="One collection", responses=error_responses(401, 403, 404, 429)
)
async def get_collection(
    caller: AdminDep, authenticator: AuthenticatorDep, store: StoreDep, runner: RunnerDep, name: CollectionName
) -> Collection:
    authenticator.authorise_collection(caller, name)
    return collection_of(await runner.run(store.get_collection, name))


@router.delete(
    "/{name}",
    response_model=CollectionDeleted,
    summary="Delete a collection with every user and descriptor of it",
    description="A collection that still holds users is refused (409 COLLECTION_NOT_EMPTY) unless `force=true`. "
    "`default` cannot be deleted (409 COLLECTION_PROTECTED).",
    responses=error_responses(401, 403, 404, 409, 429),
)
async def delete_collection(
    admin: AuditedAdminDep,
    authenticator: AuthenticatorDep,
    store: StoreDep,
    runner: RunnerDep,
    name: CollectionName,
    force: Annotated[bool, Query(description="Delete the collection's users with it")] = False,
) -> CollectionDeleted:
    authenticator.authorise_collection(admin.caller, name)
    deleted = await runner.run(store.delete_collection, name, force=force)
    admin.record("delete_collection", None, collection=name, users_deleted=deleted)
    return CollectionDeleted(name=name, users_deleted=deleted)
