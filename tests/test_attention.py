"""S2Config(attention=...): torch's SDPA backend for the wrapped transformer (s2fast/attention.py)."""

import pytest
import torch

import s2fast
from s2fast import S2Config
from s2fast.attention import AttentionChoice, attention_backend, fastest, time_backends


def test_fastest_picks_the_least_time_and_skips_refusals():
    assert fastest({"flash": None, "efficient": 2.0, "math": 1.0}) == "math"
    with pytest.raises(RuntimeError, match="no scaled-dot-product-attention backend"):
        fastest({"flash": None})


def test_time_backends_marks_a_refusing_backend_none():
    q = torch.randn(1, 2, 8, 4)
    ran = []

    def run():
        torch.nn.functional.scaled_dot_product_attention(q, q, q)

    times = time_backends(run, torch.device("cpu"), names=("flash", "cudnn", "math"),
                          timer=lambda fn, device, rounds: ran.append(fn) or float(len(ran)))
    assert times == {"flash": 1.0, "cudnn": None, "math": 2.0}  # no cuDNN attention on the CPU: refused, not timed


def test_choice_is_measured_once_per_signature():
    calls = []
    times = {1: 2.0, 2: 1.0, 3: 3.0}  # the second backend that runs here is the fastest

    choice = AttentionChoice("fastest", timer=lambda fn, device, rounds: calls.append(1) or times.get(len(calls), 9.0))
    run = lambda: None  # noqa: E731
    picked = choice.backend_for(("sig",), run, torch.device("cpu"))
    measured = choice.measured[("sig",)]
    assert measured[picked] == 1.0  # the least time of the backends that ran
    timed = len(calls)
    assert choice.backend_for(("sig",), run, torch.device("cpu")) == picked and len(calls) == timed  # not re-measured
    assert AttentionChoice("default").backend_for(("s",), run, torch.device("cpu")) is None
    assert AttentionChoice("math").backend_for(("s",), run, torch.device("cpu")) == "math"


def test_backend_context_selects_the_kernel():
    q = torch.randn(1, 2, 8, 4)
    with attention_backend("math"):
        math = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with attention_backend("default"):
        default = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(math, default, atol=1e-6, rtol=1e-5)  # the same attention, maybe another kernel
    with pytest.raises(RuntimeError):
        with attention_backend("cudnn"):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_default_changes_nothing_and_forced_backends_run_the_pipeline(sd3):
    pipe = sd3.pipe
    run = lambda: sd3(steps=3)  # noqa: E731
    s2fast.wrap(pipe, S2Config(seed=0))
    base = run()
    try:
        s2fast.wrap(pipe, S2Config(seed=0, attention="default"))
        assert torch.equal(run(), base)
        s2fast.wrap(pipe, S2Config(seed=0, attention="math"))
        torch.testing.assert_close(run(), base, atol=1e-4, rtol=1e-4)  # another kernel: fp32 rounding only
        s2fast.wrap(pipe, S2Config(seed=0, attention="fastest"))
        torch.testing.assert_close(run(), base, atol=1e-4, rtol=1e-4)
        chosen = s2fast.serving.controller_of(pipe).state(pipe.transformer).attention.chosen
        assert len(chosen) == 1 and next(iter(chosen.values())) in ("flash", "efficient", "math")
    finally:
        s2fast.unwrap(pipe)
    with pytest.raises(ValueError, match="attention"):
        S2Config(attention="flash-attn")
