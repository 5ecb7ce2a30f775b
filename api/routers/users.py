"""List, read, rename and delete registered users, and add faces to one: always within one collection (a user
id of another collection answers 404, exactly like an unknown one)."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api.deps import (
    AdminDep,
    AuditedAdminDep,
    CollectionDep,
    PhotosDep,
    RecognitionDep,
    RegisterOptionsDep,
    RunnerDep,
    StoreDep,
)
from api.routers._convert import register_result, user_of
from api.schemas.common import error_responses
from api.schemas.users import RegisterResult, User, UserPage, UserRename

router = APIRouter(prefix="/api/users", tags=["users"])

UserId = Annotated[str, Path(min_length=1, max_length=64, description="The id returned by /api/register")]


@router.get("", response_model=UserPage, summary="List registered users", responses=error_responses(401, 403, 429))
async def list_users(
    _: AdminDep,
    store: StoreDep,
    runner: RunnerDep,
    collection: CollectionDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> UserPage:
    records, total = await runner.run(store.list_users, offset, limit, collection=collection)
    return UserPage(items=[user_of(r) for r in records], total=total)


@router.get("/{user_id}", response_model=User, summary="One user", responses=error_responses(401, 403, 404, 429))
async def get_user(_: AdminDep, store: StoreDep, runner: RunnerDep, collection: CollectionDep, user_id: UserId) -> User:
    return user_of(await runner.run(store.get, user_id, collection=collection))


@router.patch("/{user_id}", response_model=User, summary="Rename a user", responses=error_responses(401, 403, 404, 422))
async def rename_user(
    admin: AuditedAdminDep,
    store: StoreDep,
    runner: RunnerDep,
    collection: CollectionDep,
    user_id: UserId,
    body: UserRename,
) -> User:
    record = await runner.run(store.rename, user_id, body.name, collection=collection)
    admin.record("rename", user_id, collection=collection)
    return user_of(record)


@router.delete(
    "/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a user and every stored descriptor of them, from memory and disk",
    responses=error_responses(401, 403, 404, 429),
)
async def delete_user(
    admin: AuditedAdminDep, store: StoreDep, runner: RunnerDep, collection: CollectionDep, user_id: UserId
) -> Response:
    await runner.run(store.delete, user_id, collection=collection)
    admin.record("delete", user_id, collection=collection)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{user_id}/faces",
    response_model=RegisterResult,
    summary="Add photos to a user (same checks as register)",
    responses=error_responses(401, 403, 404, 409, 413, 415, 422, 429, 503),
)
async def add_faces(
    user_id: UserId,
    admin: AuditedAdminDep,
    recognition: RecognitionDep,
    store: StoreDep,
    runner: RunnerDep,
    options: RegisterOptionsDep,
    photos: PhotosDep,
) -> RegisterResult:
    outcome = await runner.run(recognition.add_faces, store, user_id, photos, options)
    admin.record("add_faces", user_id, collection=options.collection, faces=outcome.user.faces)
    return register_result(outcome)
