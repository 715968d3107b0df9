"""Accounts: score one (a buyer's, seller's or wallet's behaviour as a whole), read one back."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from risk_engine.accounts import AccountIn
from risk_engine.service.deps import Analyst, EngineDep, Listing, Scorer
from risk_engine.service.responses import JsonResponse, answer
from risk_engine.service.schemas import ERRORS, AccountScoreOut, IdPath, errors

router = APIRouter(prefix="/v1/accounts", tags=["accounts"])
ALREADY_SCORED = "The account_id was already scored with a different request"


@router.post("/score", response_model=AccountScoreOut, responses=errors(conflict=ALREADY_SCORED))
async def score_account(account: AccountIn, engine: EngineDep, _: Scorer, request: Request) -> Response:
    """Score an account: decision, 0-100 score and reasons. Idempotent on ``account_id``."""
    return await answer(engine.score_event("account", account), request)


@router.get("", responses=ERRORS)
def list_accounts(listing: Listing, engine: EngineDep, _: Analyst) -> JsonResponse:
    """Stored accounts, newest first, with their decision, score and the rules that fired: filter by ``decision``
    and ``unlabelled`` for a review queue; page with ``before_id``."""
    return JsonResponse(engine.list_events("account", listing))


@router.get("/{account_id}", responses=errors(not_found="No account event with that id"))
def get_account(account_id: IdPath, engine: EngineDep, _: Scorer) -> JsonResponse:
    """A stored account scoring: decision, aggregates and features."""
    return JsonResponse(engine.get_event("account", account_id))
