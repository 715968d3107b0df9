"""Named lists used by rules (`x in list("name")`)."""

from __future__ import annotations

from fastapi import APIRouter

from risk_engine.engine import NotFound
from risk_engine.service.deps import Analyst, EngineDep
from risk_engine.service.responses import JsonResponse
from risk_engine.service.schemas import ERRORS, ListEntryIn, ListEntryOut, ListEntryRemove, errors

router = APIRouter(prefix="/v1/lists", tags=["lists"])
NO_LIST = "No list by that name"


@router.get("", responses=ERRORS)
def list_lists(engine: EngineDep, _: Analyst) -> JsonResponse:
    """Declared lists with their kinds and live entry counts."""
    sets = engine.lists.sets
    return JsonResponse(
        [
            {"name": d.name, "kind": d.kind, "description": d.description, "entries": len(sets.get(d.name, ()))}
            for d in engine.list_decls.values()
        ]
    )


@router.get("/{list_name}/entries", responses=errors(not_found=NO_LIST))
def list_entries(list_name: str, engine: EngineDep, _: Analyst) -> JsonResponse:
    """A list's entries: values of PII lists are shown masked; who added each, and when it expires."""
    return JsonResponse(engine.list_entries(list_name))


@router.delete(
    "/{list_name}/entries", status_code=200, responses=errors(not_found="No such list, or the value is not on it")
)
def remove_entry(list_name: str, entry: ListEntryRemove, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Remove a value (audited). Removing a value that is not there answers 404."""
    if not engine.remove_list_entry(list_name, entry.value, f"key:{who.key_id}"):
        raise NotFound(f"that value is not on {list_name}")
    return JsonResponse({"list": list_name, "removed": True})


@router.post("/{list_name}/entries", response_model=ListEntryOut, status_code=201, responses=errors(not_found=NO_LIST))
def add_entry(list_name: str, entry: ListEntryIn, engine: EngineDep, who: Analyst) -> JsonResponse:
    """Add a value; PII lists keep only its blind index. Idempotent on the value."""
    view = engine.add_list_entry(list_name, entry.value, f"key:{who.key_id}", entry.expires_at, entry.note)
    return JsonResponse(view, status_code=201)
