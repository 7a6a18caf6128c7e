"""Results users did not ask to change stay unchanged: other dtypes, guidance-distilled Flux, LoRA scale kwargs,
and no class is touched by wrap."""

import pytest
import torch

import s2fast
from s2fast import S2Config, tiny

MASKS = ((2,), (1, 3), (), (4,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_omega_zero_is_bit_identical_to_stock_cfg(dtype):
    # The combination is written in the pipeline's op order, so each op rounds exactly where the stock CFG line
    # rounds: in bf16/fp16 too, not only in fp32.
    shape = tiny.SD3Shape()
    pipe = tiny.sd3_pipeline(shape, dtype=dtype, with_vae=False)
    kw = dict(tiny.embeddings(shape, dtype=dtype), **tiny.image_size(pipe, shape), num_inference_steps=3,
              guidance_scale=5.0, output_type="latent")
    stock = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    s2fast.wrap(pipe, S2Config(omega=0.0))
    assert torch.equal(pipe(**kw, generator=torch.Generator().manual_seed(0)).images, stock)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=((1,), (2, 3), (4,))))
    s2 = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert s2.dtype == dtype and torch.isfinite(s2.float()).all() and not torch.equal(s2, stock)


def test_guidance_distilled_flux_matches_the_reference():
    from conftest import Family
    from s2_reference import flux_three_pass

    shape = tiny.FluxShape()
    pipe = tiny.flux_pipeline(shape, guidance_embeds=True)
    fam = Family("flux-dev", pipe, shape, tiny.embeddings(shape), tiny.image_size(pipe, shape), "true_cfg_scale",
                 flux_three_pass, 5, extra={"guidance_scale": 3.5})
    expected = fam.reference(MASKS, omega=0.5)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS, batch_branches=False))
    torch.testing.assert_close(fam(), expected, atol=0, rtol=0)  # unbatched: the reference's own batch sizes
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS))
    torch.testing.assert_close(fam(), expected, atol=2e-5, rtol=1e-5)  # batched: see test_guidance.py


def test_lora_scale_in_attention_kwargs_is_handled_like_the_stock_forward(family):
    # Without the PEFT backend the stock forward pops "scale" and ignores it; the blocks never see it.
    stock = family(joint_attention_kwargs={"scale": 0.5})
    s2fast.wrap(family.pipe, S2Config(omega=0.0, batch_branches=family.name == "sd3"))
    torch.testing.assert_close(family(joint_attention_kwargs={"scale": 0.5}), stock, atol=0, rtol=0)


def test_wrap_touches_no_class(family):
    pipe_cls, model_cls = type(family.pipe), type(family.pipe.transformer)
    before = (dict(vars(pipe_cls)), dict(vars(model_cls)), [dict(vars(type(b))) for b in family.pipe.transformer.modules()])
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=0))
    family()
    after = (dict(vars(pipe_cls)), dict(vars(model_cls)), [dict(vars(type(b))) for b in family.pipe.transformer.modules()])
    assert type(family.pipe) is pipe_cls and type(family.pipe.transformer) is model_cls
    assert before == after
