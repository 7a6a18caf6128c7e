"""S2Config(correction_every=k): the sub-networks run on every k-th S² step of a denoiser, and the steps between
reuse the stored correction Δ = S̄ − D_c. Checked against plain loops with a Δ store written in the tests
(tests/s2_reference.py, CorrectionReuse) on SD3, Flux with true CFG, Wan 2.2's two experts, DiT and the digits
pipeline; the fused step against the unfused one; the stores' lifetime; s2fast.trace_steps against the steps the
reference ran.

Tolerances are those of each family's S² test against its reference (batched rows against batch-B forwards: fp32
rounding of different batch sizes, ~1e-6 relative); reuse moves the result by far more (each comparison also checks
that the output differs from k = 1's by more than the tolerance, so a store that is never used fails).
"""

import numpy as np
import pytest
import torch
from s2_reference import CorrectionReuse, dit_three_pass, wan_three_pass
from s2fast.kernels import correction_of, dispatch, guided_flow_step
from s2fast.kernels.flow_step_reference import reference_flow_step
from test_wan import _CASES as WAN_CASES
from test_wan import STEPS as WAN_STEPS

import s2fast
from s2fast import S2Config, SGGConfig, tiny
from s2fast.graphs import EagerBackend
from s2fast.plan import StepGuidance, with_correction_reuse
from s2fast.step_trace import StepRecord

# a plain CFG step (()) in the middle must neither compute nor age the stored Δ
MASKS = ((2,), (1, 3), (), (4,), (1,), (3,))
STEPS = len(MASKS)


def records(log):
    return tuple(StepRecord(correction=c) for c in log)


def corrections(pipe):
    return tuple(r.correction for r in s2fast.trace_steps(pipe))


# --- the plan -----------------------------------------------------------------------------------------------------
def test_the_plan_counts_s2_steps_and_computes_first_and_every_kth():
    step = StepGuidance(((2,),), omega=0.5)
    config = S2Config(correction_every=3)
    assert with_correction_reuse(config, step, None) is step  # nothing stored yet: computes
    assert with_correction_reuse(config, step, 0).reuse_correction  # computed at the last S² step
    assert with_correction_reuse(config, step, 1).reuse_correction
    assert with_correction_reuse(config, step, 2) is step  # reused on k − 1 = 2 steps: computes again
    assert with_correction_reuse(S2Config(), step, 0) is step  # k = 1: the step itself
    cfg_step = StepGuidance()
    assert with_correction_reuse(config, cfg_step, 0) is cfg_step and cfg_step.correction == "none"
    reused = with_correction_reuse(config, step, 0)
    assert reused.subnets == step.subnets and not reused.computes_subnets and reused.correction == "reused"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_correction_every_is_validated(bad):
    with pytest.raises(ValueError, match="correction_every"):
        S2Config(correction_every=bad)


def test_numpy_integers_are_accepted_and_guiders_refuse_it():
    assert S2Config(correction_every=np.int64(2)).correction_every == 2
    with pytest.raises(ValueError, match="correction_every"):
        s2fast.S2Guidance(4.0, S2Config(correction_every=2))


# --- SD3 and Flux with true CFG -----------------------------------------------------------------------------------
def run_family(family, config, **kw):
    s2fast.wrap(family.pipe, config)
    return family(steps=STEPS, **kw)


@pytest.mark.parametrize("every", [2, 3])
def test_sd3_and_flux_match_a_plain_loop_with_a_correction_store(family, every):
    reuse = CorrectionReuse(every)
    expected = family.reference_loop(family.pipe, family.emb, MASKS, steps=STEPS, lam=4.0, omega=0.5, cfg=True,
                                     reuse=reuse, **family.size)
    got = run_family(family, S2Config(omega=0.5, masks=MASKS, correction_every=every))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert s2fast.trace_steps(family.pipe) == records(reuse.log)
    assert s2fast.trace(family.pipe) == MASKS  # a reuse step's mask is reported: the schedule does not depend on k
    assert "reused" in reuse.log and reuse.log[2] == "none"
    every_step = run_family(family, S2Config(omega=0.5, masks=MASKS))
    assert (every_step - got).abs().max() > 1e-3  # the reused Δ is not the fresh one: the check is not vacuous


def test_k1_is_the_uncached_result_bit_for_bit(sd3):
    plain = run_family(sd3, S2Config(omega=0.5, masks=MASKS))
    assert torch.equal(run_family(sd3, S2Config(omega=0.5, masks=MASKS, correction_every=1)), plain)
    assert corrections(sd3.pipe) == ("computed", "computed", "none", "computed", "computed", "computed")


def test_sampled_masks_do_not_depend_on_k_and_trace_replays_the_call(sd3):
    run_family(sd3, S2Config(omega=0.5, seed=11))
    at_k1 = s2fast.trace(sd3.pipe)
    config = S2Config(omega=0.5, seed=11, correction_every=2)
    got = run_family(sd3, config)
    assert s2fast.trace(sd3.pipe) == at_k1
    assert corrections(sd3.pipe) == ("computed", "reused") * 3
    replay = run_family(sd3, S2Config(omega=0.5, masks=s2fast.trace(sd3.pipe), correction_every=2))
    assert torch.equal(replay, got)


def test_without_cfg_the_correction_applies_to_the_cond_prediction(sd3):
    reuse = CorrectionReuse(2)
    expected = sd3.reference_loop(sd3.pipe, sd3.emb, MASKS, steps=STEPS, lam=4.0, omega=0.5, cfg=False,
                                  reuse=reuse, **sd3.size)
    got = run_family(sd3, S2Config(omega=0.5, masks=MASKS, correction_every=2), cfg=False)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_fused_step_equals_unfused_on_reuse_steps(sd3):
    # the fused step on the CPU runs the torch reference of the kernel (fused_step=True); mode "exact" is the
    # unfused sequence bit for bit, reuse steps included
    config = S2Config(omega=0.5, masks=MASKS, correction_every=2, step_mode="exact")
    unfused = run_family(sd3, config.replace(fused_step=False))
    fused = run_family(sd3, config.replace(fused_step=True))
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("fork_mode", ["separate", "join"])
def test_block_graphs_serve_reuse_steps_as_eager_blocks(sd3, fork_mode):
    config = S2Config(omega=0.5, masks=MASKS, correction_every=2, fork_mode=fork_mode)
    eager = run_family(sd3, config)
    captures = {}
    for k in (1, 2):  # unwrap releases the graphs: each k captures afresh
        s2fast.unwrap(sd3.pipe)
        s2fast.wrap(sd3.pipe, config.replace(correction_every=k), _graph_backend=EagerBackend())
        graphed = sd3(steps=STEPS)
        captures[k] = s2fast.graph_stats(sd3.pipe)["captures"]
    torch.testing.assert_close(graphed, eager, atol=1e-6, rtol=1e-6)  # same blocks, only the call path differs
    # the reuse steps' [uncond, cond]-only predictions replay graphs that k = 1 captures too: nothing new
    assert captures[2] == captures[1] > 0 and corrections(sd3.pipe).count("reused") == 2


# --- the stores' lifetime -----------------------------------------------------------------------------------------
def test_a_new_call_a_new_config_and_unwrap_start_with_empty_stores(sd3):
    config = S2Config(omega=0.5, masks=MASKS, correction_every=3)
    first = run_family(sd3, config)
    # a Δ left from the last call would be reused at the first S² step: the call would differ
    assert torch.equal(sd3(steps=STEPS), first) and corrections(sd3.pipe)[0] == "computed"
    assert torch.equal(run_family(sd3, config.replace(seed=1)), first)  # a new config (re-wrap)
    s2fast.unwrap(sd3.pipe)
    assert torch.equal(run_family(sd3, config), first)


def test_a_new_resolution_starts_with_an_empty_store(sd3):
    config = S2Config(omega=0.5, masks=MASKS, correction_every=3)
    size = {k: v // 2 for k, v in sd3.size.items()}
    s2fast.wrap(sd3.pipe, config)
    sd3(steps=STEPS)  # a Δ of the default size would not even fit
    small = sd3(steps=STEPS, **size)
    s2fast.unwrap(sd3.pipe)
    assert torch.equal(run_family(sd3, config, **size), small)


# --- Wan 2.2: two experts, each with its own store ----------------------------------------------------------------
def test_wan22_experts_keep_their_own_store_and_the_switch_step_computes():
    case = WAN_CASES["wan22"]  # two steps on each expert
    masks = ((1,), (2,), (3,), (2,))
    reuse = CorrectionReuse(3)
    emb = case.emb
    expected = wan_three_pass(case.pipe, emb, masks, steps=WAN_STEPS, lam=4.0, lam_2=case.call["guidance_scale_2"],
                              omega=0.5, reuse=reuse, **case.size)
    # with one store for both, k = 3 would reuse at step 2 and compute at step 3
    assert reuse.log == ["computed", "reused", "computed", "reused"]
    try:
        s2fast.wrap(case.pipe, S2Config(omega=0.5, masks=masks, correction_every=3))
        got = case()
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # test_wan.py's tolerance, reason there
        assert s2fast.trace_steps(case.pipe) == records(reuse.log)
        assert s2fast.trace_denoisers(case.pipe) == ("transformer",) * 2 + ("transformer_2",) * 2
        s2fast.wrap(case.pipe, S2Config(omega=0.5, masks=masks))
        assert (case() - got).abs().max() > 1e-3
    finally:
        s2fast.unwrap(case.pipe)


# --- DiT and the digits pipeline (guidance on part of the channels; [cond, null] batches) -------------------------
LABELS = [3, 7]


def _dit_run(pipe, config, lam):
    s2fast.wrap(pipe, config)
    try:
        return pipe(class_labels=LABELS, guidance_scale=lam, num_inference_steps=STEPS, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images, corrections(pipe)
    finally:
        s2fast.unwrap(pipe)


@pytest.mark.parametrize("lam", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_dit_matches_a_plain_loop_with_a_correction_store(lam):
    pipe = tiny.dit_pipeline()
    reuse = CorrectionReuse(2)
    latents = dit_three_pass(pipe, LABELS, MASKS, steps=STEPS, lam=lam, omega=0.5, reuse=reuse)
    expected = (pipe.vae.decode(1 / pipe.vae.config.scaling_factor * latents).sample / 2 + 0.5).clamp(0, 1)
    got, log = _dit_run(pipe, S2Config(omega=0.5, masks=MASKS, correction_every=2), lam)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)  # test_dit.py's tolerance, reason there
    assert log == tuple(reuse.log)
    every_step, _ = _dit_run(pipe, S2Config(omega=0.5, masks=MASKS), lam)
    assert (every_step - got).abs().max() > 1e-3


def test_digits_matches_a_plain_loop_with_a_correction_store():
    from s2fast.digits.model import build_scheduler, build_transformer
    from s2fast.digits.pipeline import DigitsFlowPipeline

    torch.manual_seed(0)
    pipe = DigitsFlowPipeline(build_transformer(num_layers=5, attention_head_dim=8).eval(), build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    reuse = CorrectionReuse(3)
    latents = dit_three_pass(pipe, LABELS, MASKS, steps=STEPS, lam=4.0, omega=0.5, null_class=10, reuse=reuse)
    got, log = _dit_run(pipe, S2Config(omega=0.5, masks=MASKS, correction_every=3), 4.0)
    torch.testing.assert_close(got, (latents / 2 + 0.5).clamp(0, 1), atol=2e-5, rtol=1e-5)
    assert log == tuple(reuse.log) == ("computed", "reused", "none", "reused", "computed", "reused")
    every_step, _ = _dit_run(pipe, S2Config(omega=0.5, masks=MASKS), 4.0)
    assert (every_step - got).abs().max() > 1e-3


def test_sgg_reports_its_skip_pass_as_computed(sd3):
    s2fast.wrap(sd3.pipe, SGGConfig(skip_blocks=(2,)))
    sd3(steps=4)
    assert corrections(sd3.pipe) == ("none", "none", "computed", "computed")


# --- the kernel: a stored Δ in place of S̄ − C ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("has_u", [True, False], ids=["cfg", "no-cfg"])
def test_the_fused_step_with_a_correction_is_its_reference(backend, dtype, has_u):
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(3, 5, 7, 11, generator=g).to(dtype)  # noqa: E731  (> one Triton program: 1155)
    x, c, u, s1, s2 = rand(), rand(), rand() if has_u else None, rand(), rand()
    lam, omega, dt = (4.3 if has_u else None), 0.27, torch.tensor(-0.0357)
    delta = correction_of(c, [s1, s2])
    for mode in ("exact", "fp32"):
        out = guided_flow_step(x, c, dt=dt, uncond=u, guidance_scale=lam, omega=omega, mode=mode, backend=backend,
                               correction=delta)
        ref, _ = reference_flow_step(x, c, u, None, dt, lam, omega, mode, correction=delta)
        if mode == "exact":
            assert torch.equal(out, ref)  # one rounding per torch op, emulated op by op: bit for bit
            # and the step's own Δ, reused, gives the step computed from its sub-networks bit for bit
            subs = guided_flow_step(x, c, dt=dt, uncond=u, sub=torch.stack([s1, s2]), guidance_scale=lam,
                                    omega=omega, mode=mode, backend=backend)
            assert torch.equal(out, subs)
        else:  # fp32 mode lets the kernel contract a·b + c (one rounding fewer): one unit of the model dtype
            torch.testing.assert_close(out, ref, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-2)


def test_the_cuda_backend_is_never_chosen_for_a_correction_and_naming_it_is_refused():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="stored correction"):
        guided_flow_step(x, x, dt=torch.tensor(-0.1), omega=0.5, correction=x, backend="cuda")
    with pytest.raises(ValueError, match="sub or correction"):
        guided_flow_step(x, x, dt=torch.tensor(-0.1), omega=0.5, sub=x, correction=x)
    name, _ = dispatch.choose(None, [x], True, skip=("cuda",))
    assert name in ("torch", "triton")
