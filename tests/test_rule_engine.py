"""The rule state machine (bridge/rules.py ``step``), property-based, against a reference model.

The model below is written from the rule's definition, not from the implementation: it
first drops late readings, then cuts the accepted readings into the episodes between
alerts, and in each finds the first reading that completes a run of true conditions long
enough and out of cooldown, then the first reading after it past the clear condition.
Derandomized in CI (tests/conftest.py profiles).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from bridge.rules import FIRE, LATE, NOTHING, RESOLVE, PairState, Rule, feed, holds, step

OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}
T0 = 1_700_000_000.0


def reference(rule: Rule, readings: list[tuple[float, float]]) -> list[tuple[str, float]]:
    """(event, device time) of each change, from the definitions."""
    accepted: list[tuple[float, float]] = []
    for ts, v in readings:
        if not accepted or ts > accepted[-1][0]:
            accepted.append((ts, v))
    assert rule.comparison is not None and rule.threshold is not None
    true = OPS[rule.comparison]
    threshold = rule.threshold

    def past_clear(v: float) -> bool:
        if rule.clear_threshold is None or rule.comparison in ("==", "!="):
            return not true(v, threshold)
        if rule.comparison in (">", ">="):
            return v < rule.clear_threshold
        return v > rule.clear_threshold

    events: list[tuple[str, float]] = []
    i, not_before = 0, float("-inf")
    while i < len(accepted):
        # Waiting: find the first reading that ends a long enough run of true conditions.
        fired = None
        run_start = None
        for j in range(i, len(accepted)):
            ts, v = accepted[j]
            if not true(v, threshold):
                run_start = None
                continue
            run_start = ts if run_start is None else run_start
            if ts - run_start >= rule.duration_s and ts >= not_before:
                fired = j
                break
        if fired is None:
            break
        events.append(("fire", accepted[fired][0]))
        # Firing: the first later reading past the clear condition resolves it.
        resolved = next((k for k in range(fired + 1, len(accepted)) if past_clear(accepted[k][1])), None)
        if resolved is None:
            break
        events.append(("resolve", accepted[resolved][0]))
        not_before = accepted[resolved][0] + rule.cooldown_s
        i = resolved + 1
    return events


def run(rule: Rule, readings: list[tuple[float, float]], s: PairState | None = None) -> list[tuple[str, float]]:
    s = s if s is not None else PairState()
    out = []
    for ts, v in readings:
        r = step(rule, s, ts, v)
        if r == FIRE:
            out.append(("fire", ts))
        elif r == RESOLVE:
            out.append(("resolve", ts))
        else:
            assert r in (NOTHING, LATE)
    return out


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    comparison = draw(st.sampled_from(sorted(OPS)))
    threshold = float(draw(st.integers(-3, 3)))
    clear = None
    if comparison in (">", ">=") and draw(st.booleans()):
        clear = threshold - draw(st.integers(0, 3))
    elif comparison in ("<", "<=") and draw(st.booleans()):
        clear = threshold + draw(st.integers(0, 3))
    return Rule(id=1, org_id=1, name="r", metric="m", comparison=comparison, threshold=threshold,
                clear_threshold=clear, duration_s=draw(st.sampled_from([0, 0, 1, 3, 10])),
                cooldown_s=draw(st.sampled_from([0, 0, 2, 5, 30])))


# Device times step forward mostly, sometimes back (late data) or not at all (a redelivery).
readings_st = st.lists(st.tuples(st.integers(-4, 6), st.integers(-5, 5)), max_size=60).map(
    lambda steps: _times(steps))


def _times(steps: list[tuple[int, int]]) -> list[tuple[float, float]]:
    out, t = [], T0
    for dt, v in steps:
        t += dt
        out.append((t, float(v)))
    return out


@given(rules(), readings_st)
def test_state_machine_matches_the_reference_model(rule: Rule, readings: list[tuple[float, float]]) -> None:
    assert run(rule, readings) == reference(rule, readings)


@given(rules(), readings_st)
def test_never_two_active_alerts_and_each_change_is_justified(rule: Rule, readings: list[tuple[float, float]]) -> None:
    events = run(rule, readings)
    assert [e for e, _ in events] == ["fire", "resolve"] * (len(events) // 2) + ["fire"] * (len(events) % 2)
    values = dict(readings[::-1])  # the first reading at each time is the one evaluated
    for kind, ts in events:
        if kind == "fire":
            assert holds(rule.comparison, values[ts], rule.threshold)


@given(rules(), readings_st, st.integers(0, 60), st.data())
def test_a_split_stream_and_a_redelivered_batch_change_nothing(rule: Rule, readings: list[tuple[float, float]],
                                                               cut: int, data: st.DataObject) -> None:
    """The state between two batches is all there is (it is what rule_state stores); a
    batch fed again after it was evaluated (a redelivery) fires and resolves nothing."""
    whole = run(rule, readings)
    s = PairState()
    first = run(rule, readings[:cut], s)
    saved = copy.copy(s)
    again = run(rule, readings[:cut], s)
    assert again == [] and s == saved
    assert first + run(rule, readings[cut:], s) == whole
    # Any earlier reading, delivered late, is ignored.
    if readings:
        late = data.draw(st.sampled_from(readings))
        if s.last_ts is not None and late[0] <= s.last_ts:
            before = copy.copy(s)
            assert step(rule, s, late[0], late[1]) == LATE and s == before


@given(rules(), readings_st, st.lists(st.integers(1, 20), max_size=10))
def test_batches_fed_at_once_give_what_the_reference_gives(rule: Rule, readings: list[tuple[float, float]],
                                                           sizes: list[int]) -> None:
    """The bridge feeds a pair one batch at a time, each sorted by device time, through
    ``feed`` (with its fast path for a batch that changes nothing)."""
    chunks, i = [], 0
    for n in [*sizes, len(readings)]:
        if i >= len(readings):
            break
        chunks.append(sorted(readings[i:i + n]))
        i += n
    s, got = PairState(), []
    for chunk in chunks:
        times, values = [t for t, _ in chunk], [v for _, v in chunk]
        changes, _late = feed(rule, s, times, values)
        got += [("fire" if r == FIRE else "resolve", times[k]) for k, r in changes]
    flat = [r for c in chunks for r in c]
    assert got == reference(rule, flat)
    # Fed again (a redelivery), every batch changes nothing.
    before = copy.copy(s)
    for chunk in chunks:
        assert feed(rule, s, [t for t, _ in chunk], [v for _, v in chunk])[0] == []
    assert s == before


def test_hysteresis_duration_and_cooldown_by_hand() -> None:
    rule = Rule(id=1, org_id=1, name="hot", metric="temp", comparison=">", threshold=30, clear_threshold=28,
                duration_s=10, cooldown_s=60)
    seq = [(0, 31), (5, 32), (10, 31), (11, 29), (12, 27), (20, 35), (70, 35), (71, 35), (100, 27.9)]
    events = run(rule, [(T0 + t, float(v)) for t, v in seq])
    # fires once held 10 s; 29 is inside the band (no clear); 27 clears; 35 at +20 is in
    # cooldown (until +72) and resets nothing; fires at +72 at the earliest: the run began at +20.
    assert events == [("fire", T0 + 10), ("resolve", T0 + 12)]
    events = run(rule, [(T0 + t, float(v)) for t, v in [*seq[:6], (72, 35), (73, 27.9)]])
    assert events == [("fire", T0 + 10), ("resolve", T0 + 12), ("fire", T0 + 72), ("resolve", T0 + 73)]
