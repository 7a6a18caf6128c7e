"""fork_mode="auto" (s2fast/fork_choice.py): joined or separate sub-network rows, per model and input shape. A join
must fit memory (its extra working set at most 10 % of the weights, decided from sizes) and be measurably faster
(5 %, timed). The clock is replaced here, so every test is deterministic: what is checked is the rule, that the
pipeline then runs the mode chosen (bit for bit the forced mode's result), when it measures, and that the two
modes agree within batch-size rounding."""

import copy
import logging

import pytest
import torch

import s2fast
from s2fast import S2Config, fork_choice, tiny

MiB = 2**20


def test_memory_rule_at_its_boundary():
    # 12 × row bytes × rows × masks against 10 % of the weights
    weights = 120 * MiB
    assert fork_choice.join_fits(MiB, 1, 1, weights)          # 12 MiB: exactly 10 %
    assert not fork_choice.join_fits(MiB + 1, 1, 1, weights)
    assert not fork_choice.join_fits(MiB, 2, 1, weights)      # two images per prompt: twice the rows
    assert not fork_choice.join_fits(MiB, 1, 2, weights)      # two sub-networks joined
    assert fork_choice.join_fits(MiB // 2, 1, 2, weights)


def _sd3_sizes(shape):
    """(row bytes, weight bytes) of an SD3 transformer of ``shape`` in fp32, as the controller counts them."""
    model = tiny.sd3_pipeline(shape, with_vae=False).transformer
    tokens = (shape.latent_size // 2) ** 2 + shape.text_tokens  # the image and the text stream of one row
    return tokens * shape.hidden * 4, sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("shape, fits", [
    # the launch-bound shape where joining made S² 1.04–1.16 × CFG against 1.5–2.2 × separate: may join
    (tiny.SD3Shape(num_layers=24, heads=1, head_dim=8, latent_size=4, text_tokens=4, joint_attention_dim=8,
                   pooled_dim=8), True),
    # the benchmark's compute-bound shape (24 × 256, 32×32 latents): small rows next to its weights; time decides
    (tiny.BENCH_SD3, True),
    # 12 blocks of 256 at 64×64 latents, where joining raised the activation peak ~30 % (separate: 7 %)
    (tiny.SD3Shape(num_layers=12, heads=4, head_dim=64, latent_size=64, text_tokens=77, joint_attention_dim=256,
                   pooled_dim=256), False),
])
def test_memory_rule_at_the_measured_shapes(shape, fits):
    row_bytes, weight_bytes = _sd3_sizes(shape)
    assert fork_choice.join_fits(row_bytes, 1, 1, weight_bytes) == fits


def test_time_modes_warms_up_alternates_and_keeps_the_best():
    ran, clock = [], iter([5.0, 9.0, 7.0, 4.0])  # join, separate, then separate, join
    timer = lambda fn, device: (fn(), next(clock))[1]  # noqa: E731
    best = fork_choice.time_modes(ran.append, torch.device("cpu"), timer, rounds=2)
    assert ran == ["join", "separate", "join", "separate", "separate", "join"]  # warm-up of each, untimed, first
    assert best == {"join": 4.0, "separate": 7.0}
    assert fork_choice.faster({"join": 0.95, "separate": 1.0}) == "join"
    assert fork_choice.faster({"join": 0.96, "separate": 1.0}) == "separate"  # within the margin: no join


@pytest.fixture
def measured(monkeypatch):
    """Replace the clock: ``measured.times`` is what time_modes reports; ``measured.calls`` counts measurements.
    Memory allows any join unless a test says otherwise."""
    class Measured:
        times = {"join": 1.0, "separate": 1.0}
        calls = 0

    def time_modes(run, device, timer):
        Measured.calls += 1
        return dict(Measured.times)

    monkeypatch.setattr(fork_choice, "time_modes", time_modes)
    monkeypatch.setattr(fork_choice, "_CHOSEN", {})  # no choice kept from other tests
    monkeypatch.setattr(fork_choice, "MEMORY_SHARE", 1e9)  # the tiny test models' rows are large next to their
    return Measured                                           # weights: here the clock decides


def _run(family, config):
    s2fast.wrap(family.pipe, config)
    return family()


@pytest.mark.parametrize("join_time, expected", [(0.5, "join"), (0.97, "separate")])
def test_auto_runs_the_mode_measured_bit_for_bit(family, measured, caplog, join_time, expected):
    measured.times = {"join": join_time, "separate": 1.0}
    config = S2Config(omega=0.5, drop_ratio=0.3, seed=2)
    with caplog.at_level(logging.INFO, logger="s2fast"):
        auto = _run(family, config)
        again = family()  # the same inputs: the choice is kept, not measured again
    forced = _run(family, config.replace(fork_mode=expected))
    assert torch.equal(auto, forced) and torch.equal(again, forced)
    said = [r.getMessage() for r in caplog.records if "fork_mode='auto'" in r.getMessage()]
    assert measured.calls == 1 and len(said) == 1 and f"chose '{expected}'" in said[0]


def test_a_join_over_the_memory_share_is_not_timed(family, measured, monkeypatch):
    monkeypatch.setattr(fork_choice, "MEMORY_SHARE", 0.0)
    measured.times = {"join": 0.1, "separate": 1.0}  # joining would be far faster, but memory rules it out
    config = S2Config(omega=0.5, drop_ratio=0.3, seed=2)
    auto = _run(family, config)
    assert measured.calls == 0
    assert torch.equal(auto, _run(family, config.replace(fork_mode="separate")))


def test_the_choice_is_kept_across_wraps_and_copies(family, measured):
    _run(family, S2Config(omega=0.5, seed=0))
    _run(family, S2Config(omega=0.25, seed=1))  # another config, the same model and inputs
    s2fast.unwrap(family.pipe)
    _run(family, S2Config(omega=0.5, seed=0))   # a later wrap samples with the same choice
    assert measured.calls == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not change the sizes the rule reads
        _run(family, S2Config(omega=0.5, seed=0))
    copied = copy.deepcopy(family.pipe)  # another model object of the same architecture: the same choice
    copied(**family.kwargs())
    assert measured.calls == 1


def test_nothing_to_join_is_never_timed(family, measured):
    _run(family, S2Config(omega=0.0, seed=0))                        # s2fast's CFG path: no sub-network
    _run(family, S2Config(omega=0.5, seed=0, batch_branches=False))  # every branch apart: nothing to join
    assert measured.calls == 0


def test_the_two_modes_agree_within_batch_rounding(family):
    """Joined rows run in a batch of 3B, separate ones in 2B and B: BLAS blocks them differently, which moves fp32
    results by ~1e-7 relative per op; after 4 steps of a tiny model that stays under 2e-5 absolute."""
    config = S2Config(omega=0.5, drop_ratio=0.3, num_masks=2, seed=5)
    join = _run(family, config.replace(fork_mode="join"))
    separate = _run(family, config.replace(fork_mode="separate"))
    assert not torch.equal(join, separate)  # the modes really differ (else the bit-for-bit tests above prove nothing)
    assert torch.allclose(join, separate, rtol=0, atol=2e-5)
    auto = _run(family, config)  # the real clock: either mode, and the same one again
    assert torch.equal(auto, join) or torch.equal(auto, separate)
    assert torch.equal(family(), auto)


def test_auto_decides_with_less_than_one_extra_prediction(monkeypatch):
    """The first call of fork_mode "auto" times one block's calls in each mode, not whole predictions: the block-rows
    its first call runs beyond the chosen mode's own first call stay under one prediction's (they were six
    predictions' worth: a warm-up and two timed rounds per mode)."""
    monkeypatch.setattr(fork_choice, "_CHOSEN", {})
    monkeypatch.setattr(fork_choice, "MEMORY_SHARE", 1e9)  # tiny rows next to tiny weights: let the clock decide
    shape = tiny.SD3Shape(num_layers=8)
    pipe, kw = tiny.sd3_latent_call(4, shape)
    rows = [0]

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rows[0] += hidden.shape[0]

    hooks = [b.register_forward_pre_hook(count, with_kwargs=True) for b in pipe.transformer.transformer_blocks]
    try:
        first = {}
        for mode in ("auto", "join", "separate"):
            s2fast.wrap(pipe, S2Config(omega=0.5, seed=0, fork_mode=mode, cuda_graphs=False))
            rows[0] = 0
            pipe(**kw, generator=torch.Generator().manual_seed(0))
            first[mode] = rows[0]
            if mode == "auto":
                chosen = s2fast.serving.controller_of(pipe)._run.memo[("fork_mode", id(pipe.transformer))]
                rows[0] = 0
                pipe(**kw, generator=torch.Generator().manual_seed(0))
                steady = rows[0]
    finally:
        for h in hooks:
            h.remove()
        s2fast.unwrap(pipe)
    one_prediction = 3 * shape.num_layers  # [uncond, cond] and a sub-network over every block, batch 1
    extra = first["auto"] - first[chosen]
    assert 0 < extra < one_prediction
    # a later call knows the choice and runs no trial: not even the blocks before the trial's block (it used to run
    # them at every call, 2 block-rows a call here, before looking the choice up)
    assert steady == first[chosen]
