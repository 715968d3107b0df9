"""Seller credit: a 0-1000 score per seller from what really happened, with each component explained (pure).

The score is a function of the seller's events up to the latest one (``as_of``), not of the order they
arrived in, so replaying an event changes nothing and recomputing from every stored event gives exactly the
stored score. The formula (also in the README, with its references):

=================  ======  ==================================================================================
component          points  from (rolling 180 days unless said)
=================  ======  ==================================================================================
fulfilment         0-250   late shipments and seller cancellations, half each; a half is gone at twice Amazon's
                           target (late-shipment rate 4%, cancellation rate 2.5%): at the target, a quarter
genuine ratings    0-300   detailed ratings (Taobao's DSR: as described, service, logistics; the overall
                           rating when none) averaged with each review's authenticity as its weight; a held or
                           rejected review weighs nothing; shrunk towards 3.0 by 10 reviews' worth of prior
disputes           0-200   order defects, disputes lost and chargebacks, per order (all gone at 2%, twice
                           Amazon's 1% order-defect-rate limit)
advances           0-100   advance compensations recovered from the seller, per order (all gone at 1%)
violations         -300-0  20 points per active penalty point; each violation's points expire
tenure and volume  0-150   log of days since the first event (full at two years) and of completed orders
                           ever (full at 5,000): diminishing returns, so volume, brushed or not, cannot buy a
                           top score (eBay's seller levels also weigh volume, capped)
=================  ======  ==================================================================================

Rates use pseudo-counts (25 orders at half the thresholds), so a seller's first few orders move the score
gently. Tiers: ``new`` (under 30 days or 20 completed orders, whatever the score), then ``bronze`` (under
600), ``silver`` (600-749), ``gold`` (750-899), ``top`` (900 and above).
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass

DAY = 86_400.0
WINDOW_S = 180 * DAY
PRIOR_ORDERS = 25.0
LATE_TARGET, CANCEL_TARGET, DEFECT_LIMIT, ADVANCE_LIMIT = 0.04, 0.025, 0.02, 0.01
RATING_PRIOR_WEIGHT, RATING_PRIOR = 10.0, 3.0
TIERS = (("top", 900), ("gold", 750), ("silver", 600), ("bronze", 0))
NEW_DAYS, NEW_ORDERS = 30, 20

EVENT_KINDS = (
    "order_shipped",  # a completed order; ``late`` if shipped after the promised time
    "order_cancelled_by_seller",
    "dispute_lost",  # the buyer won
    "chargeback",
    "advance_recovered",  # an advance compensation paid to a buyer and recovered from the seller
    "violation",  # ``points`` that expire at ``expires_at``
    "rating",  # a scored review: ``value`` 1-5 and its ``weight`` (authenticity, 0 if held or rejected)
    "seen",  # anything else from the seller: counts only for tenure
)


@dataclass(frozen=True, slots=True)
class CreditEvent:
    """One fact about a seller, as the credit score reads it."""

    at: float  # epoch seconds
    kind: str
    late: bool = False
    value: float = 0.0  # a rating, 1-5
    weight: float = 0.0  # a rating's weight, 0-1
    points: float = 0.0  # a violation's penalty points
    expires_at: float = 0.0  # when a violation's points expire


@dataclass(frozen=True, slots=True)
class Component:
    """One part of the score: its points, its bounds and what it was computed from."""

    name: str
    points: float
    low: float
    high: float
    detail: dict[str, float]


@dataclass(frozen=True, slots=True)
class CreditScore:
    """A seller's score as of a time."""

    score: int
    tier: str
    as_of: float
    components: tuple[Component, ...]


@dataclass
class Tally:
    """What the formula reads, in exact integers: a batch count and a running one agree to the last unit."""

    as_of: float = 0.0
    first: float = 0.0
    shipped: int = 0  # in the window, and below
    late: int = 0
    cancelled: int = 0
    defects: int = 0
    advances: int = 0
    rating_weight: int = 0  # sum of weights in percent
    rating_mass: int = 0  # sum of weight% * (rating * 6): exact for means of one to three ratings
    active_points: float = 0.0  # violations active at as_of
    completed: int = 0  # shipped orders ever


WINDOW_CUT_AT = 1_024  # events past a seller's window kept until they are this many and half of it

_WINDOWED = {
    "order_shipped": "shipped",
    "order_cancelled_by_seller": "cancelled",
    "dispute_lost": "defects",
    "chargeback": "defects",
    "advance_recovered": "advances",
}


def _rating_ints(e: CreditEvent) -> tuple[int, int]:
    weight = round(e.weight * 100)
    return weight, weight * round(e.value * 6)


def _window_add(t: Tally, e: CreditEvent, sign: int) -> None:
    field_name = _WINDOWED.get(e.kind)
    if field_name is not None:
        setattr(t, field_name, getattr(t, field_name) + sign)
        if e.kind == "order_shipped" and e.late:
            t.late += sign
    elif e.kind == "rating":
        weight, mass = _rating_ints(e)
        t.rating_weight += sign * weight
        t.rating_mass += sign * mass


def tally(events: list[CreditEvent]) -> Tally:
    """The tally of a set of events as of the latest one (batch)."""
    t = Tally()
    if not events:
        return t
    t.as_of = max(e.at for e in events)
    t.first = min(e.at for e in events)
    since = t.as_of - WINDOW_S
    for e in events:
        if e.at > since:
            _window_add(t, e, 1)
        if e.kind == "order_shipped":
            t.completed += 1
        if e.kind == "violation" and e.at <= t.as_of < e.expires_at:
            t.active_points += e.points
    return t


class SellerFacts:
    """One seller's credit facts, folded in as they come (in any order): the same tally as ``tally`` over
    every event so far, kept in time per event instead of a pass over the seller's whole history."""

    def __init__(self) -> None:
        self.t = Tally()
        # in time order from ``_start``; what is before it has left the window, and is cut off only once it is
        # half the list (a cut per event moved the whole window: a big seller's 180 days hold a million)
        self._window: list[tuple[float, int, CreditEvent]] = []
        self._start = 0
        self._violations: list[tuple[float, int, CreditEvent]] = []  # heap on expiry
        self._n = 0
        self._empty = True

    def add(self, event: CreditEvent) -> None:
        """Fold in an event (the caller makes sure each is added once)."""
        t = self.t
        self._n += 1
        if self._empty:
            t.as_of = t.first = event.at
            self._empty = False
        t.first = min(t.first, event.at)
        if event.kind == "order_shipped":
            t.completed += 1
        if event.at > t.as_of - WINDOW_S and (event.kind in _WINDOWED or event.kind == "rating"):
            bisect.insort(self._window, (event.at, self._n, event), lo=self._start)
            _window_add(t, event, 1)
        if event.kind == "violation":
            heapq.heappush(self._violations, (event.expires_at, self._n, event))
            if event.at <= t.as_of < event.expires_at:
                t.active_points += event.points
        if event.at > t.as_of:
            self._advance(event.at)

    def _advance(self, as_of: float) -> None:
        t = self.t
        t.as_of = as_of
        since = as_of - WINDOW_S
        window = self._window
        start = self._start
        while start < len(window) and window[start][0] <= since:
            _window_add(t, window[start][2], -1)
            start += 1
        if start > WINDOW_CUT_AT and start > len(window) // 2:
            del window[:start]
            start = 0
        self._start = start
        violations = self._violations
        while violations and violations[0][0] <= as_of:
            heapq.heappop(violations)
        # every violation left has not expired and started no later than as_of (the latest event)
        t.active_points = float(sum(e.points for _, _, e in violations))

    def score(self) -> CreditScore:
        """The score as of the latest event."""
        return score_tally(self.t)


def _rate_points(count: float, orders: float, target: float) -> tuple[float, float]:
    """(rate with pseudo-counts at half the target, the share of points lost: 1 at twice the target)."""
    rate = (count + PRIOR_ORDERS * target / 2) / (orders + PRIOR_ORDERS)
    return rate, min(1.0, rate / (2 * target))


def credit_score(events: list[CreditEvent]) -> CreditScore:
    """The score of a seller with these events, as of the latest one (order does not matter)."""
    if not events:
        return CreditScore(0, "new", 0.0, ())
    return score_tally(tally(events))


def score_tally(t: Tally) -> CreditScore:
    """The formula (module docstring) applied to a tally."""
    orders = t.shipped + t.cancelled
    late_rate, late_loss = _rate_points(t.late, orders, LATE_TARGET)
    cancel_rate, cancel_loss = _rate_points(t.cancelled, orders, CANCEL_TARGET)
    fulfilment = 250.0 * (1.0 - 0.5 * late_loss - 0.5 * cancel_loss)

    weight = t.rating_weight / 100
    average = (t.rating_mass / 600 + RATING_PRIOR_WEIGHT * RATING_PRIOR) / (weight + RATING_PRIOR_WEIGHT)
    genuine = 300.0 * (average - 1.0) / 4.0

    defect_rate, defect_loss = _rate_points(t.defects, orders, DEFECT_LIMIT / 2)
    disputes = 200.0 * (1.0 - defect_loss)

    advance_rate, advance_loss = _rate_points(t.advances, orders, ADVANCE_LIMIT / 2)
    advances = 100.0 * (1.0 - advance_loss)

    violations = -min(300.0, 20.0 * t.active_points)

    days = (t.as_of - t.first) / DAY
    tenure = 75.0 * min(1.0, math.log1p(days) / math.log1p(730))
    volume = 75.0 * min(1.0, math.log1p(t.completed) / math.log1p(5000))

    components = (
        Component(
            "fulfilment",
            fulfilment,
            0,
            250,
            {"orders": orders, "late_rate": late_rate, "cancel_rate": cancel_rate},
        ),
        Component("genuine_ratings", genuine, 0, 300, {"weighted_average": average, "weight": weight}),
        Component("disputes", disputes, 0, 200, {"defects": t.defects, "defect_rate": defect_rate}),
        Component("advances", advances, 0, 100, {"recovered": t.advances, "rate": advance_rate}),
        Component("violations", violations, -300, 0, {"active_points": t.active_points}),
        Component(
            "tenure_and_volume",
            tenure + volume,
            0,
            150,
            {"days": days, "completed_orders": t.completed},
        ),
    )
    score = max(0, min(1000, round(sum(c.points for c in components))))
    established = days >= NEW_DAYS and t.completed >= NEW_ORDERS
    tier = next(name for name, at in TIERS if score >= at) if established else "new"
    return CreditScore(score, tier, t.as_of, components)


_MERCHANT_KINDS = {
    "order_shipped": "order_shipped",
    "order_cancelled_by_seller": "order_cancelled_by_seller",
    "chargeback": "chargeback",
    "advance_recovered": "advance_recovered",
    "violation": "violation",
}


def credit_event_from(
    subject: str, record: dict[str, object], at: float, decision: str, score: int
) -> CreditEvent | None:
    """The credit fact in a scored event of a seller (None for subjects that carry none).

    A review counts as a rating weighted by its authenticity (``100 - score``) when it was published, and as
    nothing when held or rejected; its value is the mean of its detailed ratings, or the overall rating.
    """
    if subject == "review":
        detailed = [record.get(k) for k in ("ratings.description", "ratings.service", "ratings.logistics")]
        values = [float(v) for v in detailed if isinstance(v, int | float)]
        overall = record.get("rating")
        value = sum(values) / len(values) if values else float(overall) if isinstance(overall, int | float) else 3.0
        weight = (100 - score) / 100 if decision == "allow" else 0.0
        return CreditEvent(at, "rating", value=value, weight=weight)
    if subject != "merchant":
        return None
    kind = str(record.get("type"))
    if kind == "dispute_resolved":
        return CreditEvent(at, "dispute_lost" if record.get("outcome") == "buyer_won" else "seen")
    mapped = _MERCHANT_KINDS.get(kind, "seen")
    if mapped == "violation":
        points = record.get("points")
        expires = record.get("expires_at")
        return CreditEvent(
            at,
            "violation",
            points=float(points) if isinstance(points, int | float) else 0.0,
            expires_at=float(expires) if isinstance(expires, int | float) else at,
        )
    return CreditEvent(at, mapped, late=bool(record.get("late")))


def score_view(seller_id: str, credit: CreditScore) -> dict[str, object]:
    """A credit score as the API shows it."""
    return {
        "seller_id": seller_id,
        "score": credit.score,
        "tier": credit.tier,
        "as_of": credit.as_of,
        "components": [
            {
                "name": c.name,
                "points": round(c.points, 1),
                "min": c.low,
                "max": c.high,
                "detail": {k: round(v, 4) for k, v in c.detail.items()},
            }
            for c in credit.components
        ],
    }
