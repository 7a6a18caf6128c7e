"""The interleaved timer behind the demo's and the benchmarks' ratios (no timing is asserted, only bookkeeping)."""

import pytest

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
    assert "below its floor 1.290" in timing_warning([1.20, 1.21, 1.22], floor=1.29)
    assert timing_warning([1.27, 1.28, 1.28], floor=1.29) is None  # within 10 % of the floor's extra cost (0.029)
    assert timing_warning([1.20, 1.21, 1.22]) is None  # no floor given: spread only


def test_block_share_and_the_step_floor_it_gives(monkeypatch):
    import torch

    from s2fast import timing

    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])  # a clock the test advances

    class Block(torch.nn.Module):
        def forward(self, x):
            clock[0] += 1.0  # one second inside each block
            return x

    blocks = [Block() for _ in range(3)]

    def call():
        for b in blocks:
            b(torch.zeros(1))
        clock[0] += 2.0  # two seconds outside them

    assert timing.block_share(blocks, call) == pytest.approx(3 / 5)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)  # hooks removed
    assert timing.step_floor(1.2, 1.0) == 1.2 and timing.step_floor(1.2, 0.5) == pytest.approx(1.1)
    assert timing.step_floor(1.2, 0.0) == 1.0
