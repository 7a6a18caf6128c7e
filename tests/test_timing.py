"""The interleaved timer behind the demo's and the benchmarks' ratios (no timing is asserted, only bookkeeping)."""

from s2fast.timing import InterleavedRounds


def test_rounds_run_every_case_once_in_shuffled_orders_and_ratios_pair_rounds():
    calls = []
    measured = {"a": iter([1.0, 2.0, 4.0]), "b": iter([2.0, 2.0, 2.0]), "c": iter([3.0, 6.0, 12.0])}

    def case(name):
        def run():
            calls.append(name)
            return next(measured[name])
        return run

    timer = InterleavedRounds({n: case(n) for n in "abc"}, seed=1)
    for _ in range(3):
        timer.run_round()
    rounds = [calls[i:i + 3] for i in range(0, 9, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds) and len({tuple(r) for r in rounds}) > 1
    assert timer.ratios("c", "a") == [3.0, 3.0, 3.0]  # within-round ratios: the drift of "a" cancels
    assert timer.ratio("b", "a") == 1.0 and timer.median("c") == 6.0


def test_cases_returning_none_are_timed_by_the_clock_and_warm_up_is_not_recorded():
    timer = InterleavedRounds({"x": lambda: None})
    timer.run_round(record=False)
    assert timer.times["x"] == []
    timer.run_round()
    assert len(timer.times["x"]) == 1 and timer.times["x"][0] >= 0.0


def test_timing_warning_flags_few_rounds_spread_and_ratios_below_the_floor():
    from s2fast.timing import timing_warning

    assert timing_warning([1.30, 1.32, 1.31], floor=1.29) is None
    assert "2 rounds only" in timing_warning([1.3, 1.3], floor=1.29)
    assert "spread by 31 %" in timing_warning([1.1, 1.5, 1.3], floor=1.0)
    assert "below the block-row floor 1.290" in timing_warning([1.20, 1.21, 1.22], floor=1.29)
    assert timing_warning([1.20, 1.21, 1.22]) is None  # no floor given: spread only
