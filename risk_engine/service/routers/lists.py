"""Named lists used by rules (`x in list("name")`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from risk_engine.errors import NotFound
from risk_engine.service.deps import Analyst, EngineDep
from risk_engine.service.responses import JsonResponse
from risk_engine.service.schemas import (
    ERRORS,
    MAX_ROW_ID,
    ListEntriesIn,
    ListEntryIn,
    ListEntryOut,
    ListImportOut,
    ListValueIn,
    errors,
)

router = APIRouter(prefix="/v1/lists", tags=["lists"])
NO_LIST = "No list by that name"


@router.get("", responses=ERRORS)
def list_lists(engine: EngineDep, _: Analyst) -> JsonResponse:
    """Declared lists with their kinds and live entry counts."""
    counts = engine.lists.counts()
    return JsonResponse(
        [
            {"name": d.name, "kind": d.kind, "description": d.description, "entries": counts.get(d.name, 0)}
            for d in engine.list_decls.values()
        ]
    )


@router.get("/{list_name}/entries", responses=errors(not_found=NO_LIST))
def list_entries(
    list_name: str,
    engine: EngineDep,
    _: Analyst,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID, description="The last id of the page before")] = None,
) -> JsonResponse:
    """A list's entries, newest first: values of PII lists are shown masked; who added each, when, and when it
    expires. Page with ``before_id`` (the last id seen)."""
    return JsonResponse(engine.list_entries(list_name, limit, before_id))


@router.post(
    "/{list_name}/entries/import", response_model=ListImportOut, status_code=200, responses=errors(not_found=NO_LIST)
)
def import_entries(list_name: str, body: ListEntriesIn, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Put up to 1,000 values on a list at once, each as adding it would (idempotent on the value; a value on it
    has its expiry, and note if one is given, restated), audited once as ``list.import``. Every value is
    checked first: one refused refuses them all (422 naming ``values.N``), with nothing stored."""
    done = engine.import_list_entries(list_name, body.values, f"key:{who.key_id}", body.expires_at, body.note)
    return JsonResponse(done)


@router.post("/{list_name}/entries/lookup", responses=errors(not_found=NO_LIST))
def lookup_entry(list_name: str, entry: ListValueIn, engine: EngineDep, _: Analyst) -> JsonResponse:
    """Whether a value is on a list, and its entry (masked) if it is: PII lists show no values to search, so
    the value is sent here, in the body (never in a URL, which logs keep). ``live``: on it and not expired."""
    return JsonResponse(engine.find_list_entry(list_name, entry.value))


@router.delete(
    "/{list_name}/entries", status_code=200, responses=errors(not_found="No such list, or the value is not on it")
)
def remove_entry(list_name: str, entry: ListValueIn, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Remove a value (audited). Removing a value that is not there answers 404."""
    if not engine.remove_list_entry(list_name, entry.value, f"key:{who.key_id}"):
        raise NotFound(f"that value is not on {list_name}")
    return JsonResponse({"list": list_name, "removed": True})


@router.post("/{list_name}/entries", response_model=ListEntryOut, status_code=201, responses=errors(not_found=NO_LIST))
def add_entry(list_name: str, entry: ListEntryIn, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Add a value; PII lists keep only its blind index. Idempotent on the value."""
    view = engine.add_list_entry(list_name, entry.value, f"key:{who.key_id}", entry.expires_at, entry.note)
    return JsonResponse(view, status_code=201)
