"""Cost of S² as a guider in diffusers' stock modular SD3 loop, against ClassifierFreeGuidance in the same loop, on
the 24-block SD3-shaped transformer of test_step_cost.py (hidden 256, 32×32 latents, 77 text tokens; random
weights, fp32, CPU unless CUDA is there). Each case is a whole call of the modular core denoise step (STEPS steps,
latents out, no VAE), the same for every case but the guider.

Cases:
- cfg-guider: ClassifierFreeGuidance, the modular default: two sequential batch-B transformer calls per step
  (the baseline of every ratio);
- s2-naive-guider: a guider written the way diffusers' own layer-skip guiders are: a third sequential batch-B cond
  call per step with the masked blocks made identity;
- s2-guider: s2fast.S2Guidance: uncond and cond in one batch-2B call, the sub-network forked off the cond rows at
  its first dropped block, the other batches served from what it computed.
Every step uses the same mask (blocks 8 and 15: first dropped block at E[k] = 8 for two of 23 droppable blocks), so
the cases do the same work each round. The block-row floor of each case is in extra_info and in the summary.

    .venv/bin/pytest benchmarks/test_guider_cost.py --benchmark-only
"""

import pytest
import torch
from diffusers import ClassifierFreeGuidance
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput
from s2fast.kernels import guided_prediction

import s2fast
from s2fast import tiny
from s2fast.engine import block_rows

SHAPE = tiny.BENCH_SD3
L = SHAPE.num_layers
LAMBDA, OMEGA = 7.0, 0.25
STEPS = 2
MASK = (8, 15)
ROUNDS = 6


class NaiveS2Guidance(BaseGuidance):
    """S² the naive way: batches cond, uncond, cond again; the third call runs with the masked blocks skipped."""

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_sub"]

    @register_to_config
    def __init__(self, guidance_scale: float = 7.0, omega: float = 0.25, mask=(8, 15)):
        super().__init__()
        self.guidance_scale, self.omega, self.mask = guidance_scale, omega, tuple(mask)

    def prepare_inputs(self, data):
        return [self._prepare_batch(data, i, n) for i, n in zip((0, 1, 0), self._input_predictions)]

    def prepare_models(self, denoiser):
        self._count_prepared += 1
        if self._count_prepared == 3:
            for i in self.mask:
                denoiser.transformer_blocks[i].forward = _skipped

    def cleanup_models(self, denoiser):
        for i in self.mask:
            denoiser.transformer_blocks[i].__dict__.pop("forward", None)

    def forward(self, pred_cond, pred_uncond=None, pred_cond_sub=None):
        pred = guided_prediction(pred_cond, pred_uncond, [pred_cond_sub], self.guidance_scale, self.omega)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self):
        return self._count_prepared in (1, 3)

    @property
    def num_conditions(self):
        return 3


def _skipped(*args, hidden_states=None, encoder_hidden_states=None, **kwargs):
    return encoder_hidden_states, hidden_states  # an SD3 block returns encoder first


@pytest.fixture(scope="module")
def setup():
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    torch.set_grad_enabled(False)
    classic = tiny.sd3_pipeline(SHAPE, with_vae=False)
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=classic.transformer, scheduler=classic.scheduler)
    pipe.set_progress_bar_config(disable=True)
    emb = tiny.embeddings(SHAPE)
    latents = torch.randn(1, 16, SHAPE.latent_size, SHAPE.latent_size, generator=torch.Generator().manual_seed(0))
    yield pipe, emb, latents
    torch.set_grad_enabled(True)


def test_guider_cost(interleaved, setup):
    pipe, emb, latents = setup
    config = s2fast.S2Config(omega=OMEGA, masks=(MASK,) * STEPS, fork_mode="separate", cuda_graphs=False)
    guiders = {
        "cfg-guider": ClassifierFreeGuidance(guidance_scale=LAMBDA),
        "s2-naive-guider": NaiveS2Guidance(LAMBDA, OMEGA, MASK),
        "s2-guider": s2fast.S2Guidance(LAMBDA, config),
    }

    def call(guider):
        pipe.update_components(guider=guider)
        return pipe(**emb, latents=latents.clone(), num_inference_steps=STEPS, output="latents")

    outs = {name: call(g) for name, g in guiders.items()}  # the two S² guiders compute the same D
    torch.testing.assert_close(outs["s2-guider"], outs["s2-naive-guider"], rtol=1e-4, atol=1e-4)
    cases = {name: (lambda g=g: call(g)) for name, g in guiders.items()}
    floors = {"cfg-guider": 1.0, "s2-naive-guider": block_rows(L, 2, [MASK], reuse_prefix=False) / (2 * L),
              "s2-guider": block_rows(L, 2, [MASK]) / (2 * L)}
    interleaved(f"modular sd3-24x256 call, {STEPS} steps, mask {MASK}", cases, "cfg-guider", ROUNDS,
                {name: {"floor_ratio": f} for name, f in floors.items()})
