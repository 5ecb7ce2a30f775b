"""Copy every user and descriptor from one store to another (``python -m api.cli store copy SRC DST``).

Streams in batches (the source is never loaded whole into the destination's memory), keeps ids, names,
collections and timestamps, skips users the destination already holds (so an interrupted copy is simply run again) and
checks the counts at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from api.errors import CollectionExistsError
from api.store.base import FaceStore

# Below this many users, inserting into a live HNSW index is fast enough; above it, building the index once
# after the load is several times faster (and the destination is empty, so nobody searches it meanwhile).
DEFER_INDEX_MIN_USERS = 20_000


class CopyCheckError(RuntimeError):
    """The destination does not hold what the copy should have left there."""


@dataclass(frozen=True)
class CopyReport:
    source_users: int
    copied: int  # added to the destination by this run
    skipped: int  # already there (an earlier, interrupted run)
    destination_users: int
    index_rebuilt: bool


def copy_store(
    source: FaceStore,
    destination: FaceStore,
    *,
    batch_size: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> CopyReport:
    """Copy ``source`` into ``destination``; ``progress(n)`` is called with the users of each batch."""
    source_users = source.count()
    before = destination.count()
    models: set[str] = set()
    rebuild = before == 0 and source_users >= DEFER_INDEX_MIN_USERS and hasattr(destination, "drop_search_index")
    copied = 0
    for collection in source.list_collections():  # empty ones too; those with users would come with them
        with contextlib.suppress(CollectionExistsError):
            destination.create_collection(collection.name)
    for batch in source.export_users(batch_size):
        copied += destination.import_users(batch)
        new_models = {u.record.model_id for u in batch} - models
        models |= new_models
        if rebuild:
            # After the model's first batch (which created its index): drop the index for the rest of the load.
            for model_id in new_models:
                destination.drop_search_index(model_id)  # type: ignore[attr-defined]
        if progress is not None:
            progress(len(batch))
    if rebuild:
        for model_id in sorted(models):
            destination.build_search_index(model_id)  # type: ignore[attr-defined]
    if copied and hasattr(destination, "refresh_statistics"):
        destination.refresh_statistics()  # the planner must know the new rows before the first search
    after = destination.count()
    skipped = source_users - copied
    if after != before + copied:
        raise CopyCheckError(
            f"the destination holds {after} users, expected {before} before + {copied} copied = {before + copied}"
        )
    if skipped < 0 or after < source_users:
        raise CopyCheckError(f"the source has {source_users} users but the destination only {after}")
    return CopyReport(source_users, copied, skipped, after, rebuild)
