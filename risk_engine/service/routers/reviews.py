"""Reviews: score one before it is published (publish, hold or reject), read one back."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from risk_engine.reviews import ReviewIn
from risk_engine.service.deps import Analyst, EngineDep, Listing, Scorer
from risk_engine.service.responses import JsonResponse, answer
from risk_engine.service.schemas import ERRORS, IdPath, ReviewScoreOut, errors

router = APIRouter(prefix="/v1/reviews", tags=["reviews"])
ALREADY_SCORED = "The review_id was already scored with a different request"


@router.post("/score", response_model=ReviewScoreOut, responses=errors(conflict=ALREADY_SCORED))
async def score_review(review: ReviewIn, engine: EngineDep, _: Scorer, request: Request) -> Response:
    """Score a review: ``publish``, ``hold`` or ``reject``, a 0-100 risk score, its authenticity (100 minus
    it) and reasons. Idempotent on ``review_id``."""
    return await answer(engine.score_event("review", review), request)


@router.get("", responses=ERRORS)
def list_reviews(listing: Listing, engine: EngineDep, _: Analyst) -> JsonResponse:
    """Stored reviews, newest first, with their decision, score and the rules that fired: filter by ``decision``
    and ``unlabelled`` for a review queue; page with ``before_id``."""
    return JsonResponse(engine.list_events("review", listing))


@router.get("/{review_id}", responses=errors(not_found="No review with that id"))
def get_review(review_id: IdPath, engine: EngineDep, _: Scorer) -> JsonResponse:
    """A stored review scoring: decision, aggregates and features, the reviewer's IP masked."""
    return JsonResponse(engine.get_event("review", review_id))
