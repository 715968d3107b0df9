"""Reading rows by id when they may commit out of id order: each row read once, none skipped."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given

from risk_engine.watermark import GAP_WAIT_S, MAX_GAPS, IdWatermark


@given(st.permutations(range(1, 60)), st.integers(min_value=1, max_value=8))
def test_rows_committing_in_any_order_are_each_read_once(order: list[int], per_poll: int) -> None:
    """Rows become visible in ``order``, ``per_poll`` at a time; each poll reads those the watermark wants."""
    read = IdWatermark()
    visible: set[int] = set()
    taken: list[int] = []
    for start in range(0, len(order), per_poll):
        visible.update(order[start : start + per_poll])
        for row_id in sorted(i for i in visible if read.wants(i)):  # what the poll's query returns
            read.note(row_id)
            taken.append(row_id)
    assert sorted(taken) == list(range(1, 60))  # none skipped, none twice
    assert not read.gaps and read.last == 59


def test_gaps_are_bounded_and_given_up_on() -> None:
    read = IdWatermark(10)
    read.note(10 + 3 * MAX_GAPS)  # a jump (a sequence after a crash, many rolled-back inserts)
    assert len(read.gaps) == MAX_GAPS and min(read.gaps) == 10 + 2 * MAX_GAPS
    assert not read.wants(11) and read.wants(10 + 3 * MAX_GAPS - 1)
    at = next(iter(read.gaps.values()))
    read.expire(at + GAP_WAIT_S - 1)
    assert len(read.gaps) == MAX_GAPS
    read.expire(at + GAP_WAIT_S + 1)
    assert not read.gaps and not read.wants(10 + 3 * MAX_GAPS - 1)
