"""What the engine remembers about sellers across subjects: credit facts and merchant flags (in memory,
rebuilt from stored events at start-up), and the enrichment of each event's record with them.

The enrichment is written into the record before the policy runs, so it is stored with the decision and a
backtest or a replay sees exactly what live scoring saw.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
from xxhash import xxh3_64_intdigest

from risk_engine.credit import CreditScore, SellerFacts, credit_event_from
from risk_engine.merchants import MERCHANT_FLAGS

FLAG_WINDOW_S = 7 * 86_400.0
SEVERITY = {"allow": 0, "challenge": 1, "review": 2, "block": 3}
_STRICTEST_FIRST = ("block", "review", "challenge")
MAX_ORDERS = 2_000_000  # orders remembered for the review link (the oldest go first)
TEXTS_PER_SELLER = 500  # recent review texts per seller compared for near-duplicates
DEVICES_PER_SELLER = 500  # a seller's most recent login devices and IPs, against which reviewers are matched
# SimHash distance for near-duplicates: one-word edits of real reviews move under 10 bits, unrelated texts ~31
NEAR_DUPLICATE_BITS = 12
_WORD = re.compile(r"\w+")
# ASCII text splits into the same words as _WORD finds, three times faster: every non-word byte a space
_ASCII_NON_WORD = bytes(c if c < 128 and (chr(c).isalnum() or chr(c) == "_") else 32 for c in range(256))


def words(text: str) -> list[str]:
    """The text's words (``\\w+``), lower case."""
    return _WORD.findall(text.lower())


def word_bytes(text: str) -> list[bytes]:
    """The text's words as ``words`` finds them, UTF-8 encoded (ASCII text split as bytes, without a string
    per word)."""
    if text.isascii():
        return text.encode().lower().translate(_ASCII_NON_WORD).split()
    return [w.encode() for w in words(text)]


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
# One 128-bit lane of a packed integer: a 64-bit value, with room above it for its product with a 64-bit constant
_LANE = b"\xff" * 8 + b"\x00" * 8
_MASKED_BYTES = 4096  # bit b of each of this many bytes: counts a column's bits by AND and bit_count
_BIT_MASKS = tuple(int.from_bytes(bytes([1 << b]) * _MASKED_BYTES, "little") for b in range(8))


def simhash(text: str) -> int:
    """64-bit SimHash of a text's word pairs (the word when alone): near texts, near hashes.

    Each word is hashed once (xxh3); a pair's hash mixes its two words' (splitmix64's finaliser); bit i of the
    signature is set when it is set in most pairs' hashes. The pairs are mixed all at once as the 128-bit lanes
    of one Python integer, and each bit counted over a column of bytes with one AND and ``bit_count``. NumPy did
    the same in fewer instructions but cost four times as much on the request path (``bench/reviews.py``):
    its calls release the GIL to the writer thread and run on cold caches.
    """
    found = word_bytes(text) or [b""]
    hashes = array("Q", map(xxh3_64_intdigest, found))
    lanes = array("Q", bytes(16 * len(hashes)))
    lanes[0::2] = hashes
    packed = int.from_bytes(lanes, "little")
    n = max(len(hashes) - 1, 1)  # pairs (a lone word is its own)
    mask = int.from_bytes(_LANE * n, "little")
    x = (packed & ((1 << 128 * n) - 1)) * _GOLDEN & mask ^ packed >> 128 if len(hashes) > 1 else packed
    x ^= x >> 30 & mask
    x = x * _MIX1 & mask
    x ^= x >> 27 & mask
    x = x * _MIX2 & mask
    x ^= x >> 31 & mask
    packed_bytes = x.to_bytes(16 * n, "little")
    bit_masks = (
        _BIT_MASKS if n <= _MASKED_BYTES else tuple(int.from_bytes(bytes([1 << b]) * n, "little") for b in range(8))
    )
    signature, bit, half = 0, 1, n // 2
    for j in range(8):
        column = int.from_bytes(packed_bytes[j::16], "little")  # byte j of every pair's hash
        for bit_mask in bit_masks:
            if (column & bit_mask).bit_count() > half:
                signature |= bit
            bit <<= 1
    return signature


class _RecentTexts:
    """A ring of a seller's recent review SimHashes, compared all at once."""

    def __init__(self, size: int) -> None:
        self.hashes = np.zeros(size, dtype=np.uint64)
        self.count = 0

    def near(self, signature: int, bits: int) -> int:
        held = self.hashes[: min(self.count, len(self.hashes))]
        return int(np.count_nonzero(np.bitwise_count(held ^ np.uint64(signature)) <= bits))

    def add(self, signature: int) -> None:
        self.hashes[self.count % len(self.hashes)] = signature
        self.count += 1


class _Order(NamedTuple):
    """A paid order, as the review link reads it. Kept as a plain tuple (``orders``), which the garbage
    collector stops tracking at its first collection (a tuple subclass it tracks for good): ``MAX_ORDERS``
    tracked objects lengthened every collection by tens of milliseconds. A change replaces it."""

    buyer_id: str | None
    seller_id: str | None
    paid_at: float
    amount: float | None
    shipped_at: float | None = None
    delivered_at: float | None = None
    shipping_address: str | None = None  # blind index


@dataclass
class _Flag:
    at: float
    decision: str
    event_id: str
    reasons: tuple[str, ...]


class PlacedOrder(NamedTuple):
    """The order a payment placed in a state, and what was there before: enough to take it back out."""

    state: MarketplaceState
    order_id: str
    before: tuple[Any, ...] | None
    placed: tuple[Any, ...]


@dataclass
class MarketplaceState:
    """Sellers' credit facts and scores, and their merchant flags."""

    SUBJECTS = ("payment", "review", "merchant", "merchant_day")

    facts: dict[str, SellerFacts] = field(default_factory=dict)
    orders: OrderedDict[str, tuple[Any, ...]] = field(default_factory=OrderedDict)  # plain tuples of _Order's fields
    # devices and IP indexes of a seller's logins, the most recent last, at most DEVICES_PER_SELLER: a seller on
    # mobile networks logs in from new IPs for ever
    seller_devices: dict[str, OrderedDict[str, None]] = field(default_factory=dict)
    texts: dict[str, _RecentTexts] = field(default_factory=dict)  # seller -> recent review SimHashes
    scores: dict[str, CreditScore] = field(default_factory=dict)
    flags: dict[str, deque[_Flag]] = field(default_factory=dict)  # a seller's recent flags other than "ok"
    latest: dict[str, float] = field(default_factory=dict)  # a seller's latest merchant event
    # when each decision (by SEVERITY) last came of a seller's merchant events: its flag in O(1) on every payment
    worst_at: dict[str, list[float]] = field(default_factory=dict)

    def credit(self, seller_id: str) -> CreditScore | None:
        """The seller's current score (None if nothing is known of it)."""
        return self.scores.get(seller_id)

    def flag(self, seller_id: str) -> str:
        """The strictest merchant flag of the 7 days up to the seller's latest merchant event: the strictest
        decision whose last time is in them ("ok" for a seller with none)."""
        worst_at = self.worst_at.get(seller_id)
        if worst_at is None:
            return MERCHANT_FLAGS["allow"]
        since = self.latest[seller_id] - FLAG_WINDOW_S
        for decision in _STRICTEST_FIRST:
            if worst_at[SEVERITY[decision]] >= since:
                return MERCHANT_FLAGS[decision]
        return MERCHANT_FLAGS["allow"]

    def place_order(
        self, record: dict[str, Any], at: float, decision: str, score: int, reasons: Iterable[str] = ()
    ) -> PlacedOrder | None:
        """``observe`` for a payment, whose only effect is the order it places (None: it placed none, being
        blocked or without an order id)."""
        order_id = record.get("order_id")
        before = self.orders.get(order_id) if isinstance(order_id, str) else None
        self.observe("payment", record, at, decision, score, reasons)
        if not isinstance(order_id, str):
            return None
        placed = self.orders.get(order_id)
        return PlacedOrder(self, order_id, before, placed) if placed is not None and placed is not before else None

    def unplace(self, placed: PlacedOrder) -> bool:
        """Take back the order a payment placed, when its write failed: True if this state is as it would be
        without that payment; False if something changed the order since (the caller rebuilds the state)."""
        if placed.state is not self:
            return True  # rebuilt from storage since: it never saw the payment
        if self.orders.get(placed.order_id) is not placed.placed:
            return False
        if placed.before is None:
            del self.orders[placed.order_id]
        else:
            self.orders[placed.order_id] = placed.before
        return True

    def _order(self, order_id: str) -> _Order | None:
        raw = self.orders.get(order_id)
        return _Order._make(raw) if raw is not None else None

    def enrich(self, subject: str, record: dict[str, Any], at: float) -> None:
        """Add ``seller.credit``, ``seller.tier`` and ``seller.flag`` as they stand before this event; to a
        review, what is known of its order, of the reviewer's devices and of texts like it."""
        seller_id = record.get("seller_id")
        if not isinstance(seller_id, str):
            return
        if subject == "review":
            self._enrich_review(seller_id, record, at)
        credit = self.scores.get(seller_id)
        if credit is not None:
            record["seller.credit"] = credit.score
            record["seller.tier"] = credit.tier
        if seller_id in self.latest:
            record["seller.flag"] = self.flag(seller_id)

    def _enrich_review(self, seller_id: str, record: dict[str, Any], at: float) -> None:
        order = self._order(str(record.get("order_id")))
        paid = order is not None and order.buyer_id == record.get("reviewer.id") and order.seller_id == seller_id
        record["order.paid"] = paid
        if order is not None and paid:
            record["order.age"] = max(0.0, at - order.paid_at)
            if order.amount is not None:
                record["order.amount"] = order.amount
            record["order.shipped"] = order.shipped_at is not None
            record["order.delivered"] = order.delivered_at is not None
            if order.delivered_at is not None:
                record["order.since_delivery"] = max(0.0, at - order.delivered_at)
            if order.shipping_address is not None:
                record["order.shipping_address"] = order.shipping_address
                record["seller_shipping_address"] = f"{seller_id}:{order.shipping_address}"
        known: Mapping[str, None] = self.seller_devices.get(seller_id, {})
        device, ip = record.get("reviewer.device"), record.get("reviewer.ip")
        record["reviewer.seller_device"] = bool(device and device in known) or bool(ip and ip in known)
        text = record.get("text")
        if isinstance(text, str) and len(text) >= 20:
            signature = simhash(text)
            recent = self.texts.get(seller_id)
            record["text.near_duplicates"] = recent.near(signature, NEAR_DUPLICATE_BITS) if recent else 0
            record["text.simhash"] = signature

    def _observe_order(self, subject: str, record: dict[str, Any], at: float, decision: str) -> None:
        order_id = record.get("order_id")
        if not isinstance(order_id, str):
            return
        if subject == "payment":
            if decision == "block":
                return
            amount = record.get("amount.major")
            address = record.get("shipping.address")
            self.orders[order_id] = tuple(
                _Order(
                    record.get("buyer.id"),
                    record.get("seller_id"),
                    at,
                    float(amount) if amount is not None else None,
                    shipping_address=address if isinstance(address, str) else None,
                )
            )
            self.orders.move_to_end(order_id)
            while len(self.orders) > MAX_ORDERS:
                self.orders.popitem(last=False)
            return
        order = self._order(order_id)
        if order is None or order.seller_id != record.get("seller_id"):  # another seller's order is not its to ship
            return
        if record.get("type") == "order_shipped":
            self.orders[order_id] = tuple(order._replace(shipped_at=at))  # in place in the order: same key
        elif record.get("type") == "order_delivered":
            self.orders[order_id] = tuple(order._replace(delivered_at=at))

    def observe(
        self,
        subject: str,
        record: dict[str, Any],
        at: float,
        decision: str,
        score: int,
        reasons: Iterable[str] = (),
    ) -> tuple[str, CreditScore] | None:
        """Learn from a scored event; returns ``(seller, new score)`` when the seller's score or tier changed
        (the first credit fact of a seller always does): what the credit history records."""
        if subject not in self.SUBJECTS:
            return None
        seller_id = record.get("seller_id")
        if not isinstance(seller_id, str):
            return None
        if subject in ("payment", "merchant"):
            self._observe_order(subject, record, at, decision)
        if subject == "payment":
            return None
        if subject == "review" and isinstance(record.get("text.simhash"), int):
            recent = self.texts.get(seller_id)
            if recent is None:
                recent = self.texts[seller_id] = _RecentTexts(TEXTS_PER_SELLER)
            recent.add(record["text.simhash"])
        if subject == "merchant" and record.get("type") == "login":
            devices = self.seller_devices.setdefault(seller_id, OrderedDict())
            for seen in (record.get("device.id"), record.get("device.ip")):
                if isinstance(seen, str):
                    devices[seen] = None
                    devices.move_to_end(seen)  # seen again: the most recent
            while len(devices) > DEVICES_PER_SELLER:
                devices.popitem(last=False)
        if subject in ("merchant", "merchant_day"):
            self.latest[seller_id] = max(at, self.latest.get(seller_id, at))
            if decision != "allow":  # most of a busy seller's events (every shipment): not kept
                flags = self.flags.setdefault(seller_id, deque(maxlen=1000))
                flags.append(_Flag(at, decision, str(record.get("event_id")), tuple(reasons)))
                worst_at = self.worst_at.setdefault(seller_id, [-math.inf] * len(SEVERITY))
                severity = SEVERITY[decision]
                worst_at[severity] = max(worst_at[severity], at)
        event = credit_event_from(subject, record, at, decision, score)
        if event is None:
            return None
        facts = self.facts.setdefault(seller_id, SellerFacts())
        facts.add(event)
        credit = facts.score()
        previous = self.scores.get(seller_id)
        self.scores[seller_id] = credit
        if previous is not None and previous.score == credit.score and previous.tier == credit.tier:
            return None
        return seller_id, credit

    def merchant_view(self, seller_id: str) -> dict[str, Any] | None:
        """The merchant's flag, the reasons behind it and its flag history (non-ok events, newest first)."""
        if seller_id not in self.latest:
            return None
        flags = self.flags.get(seller_id, deque())
        since = self.latest[seller_id] - FLAG_WINDOW_S
        current = self.flag(seller_id)
        active = [f for f in flags if f.at >= since and f.decision != "allow"]
        return {
            "seller_id": seller_id,
            "flag": current,
            "reasons": sorted({code for f in active for code in f.reasons}),
            "history": [
                {
                    "at": datetime.fromtimestamp(f.at, UTC).isoformat(),
                    "flag": MERCHANT_FLAGS[f.decision],
                    "event_id": f.event_id,
                    "reasons": list(f.reasons),
                }
                for f in reversed(flags)
                if f.decision != "allow"
            ][:100],
        }
