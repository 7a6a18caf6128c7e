"""Model CPU offload (accelerate): S² runs beneath the offload hook, on the device the hook moves the model to.

On the CPU, diffusers' enable_model_cpu_offload(device="cpu") installs the same hooks with a CPU execution device:
what can be shown here is the hook chain and the results; the memory promise needs a GPU (the gpu-marked test).
"""

import pytest
import torch

import s2fast
from s2fast import S2Config, binding, tiny
from s2fast.binding import ModelForward

MASKS_4 = ((2,), (1, 3), (), (4,))
EXACT = dict(atol=0.0, rtol=0.0)


def _pipe(device="cpu"):
    shape = tiny.SD3Shape()
    pipe = tiny.sd3_pipeline(shape, with_vae=False).to(device)
    emb = {k: v.to(device) for k, v in tiny.embeddings(shape).items()}

    def call(**more):
        kw = dict(emb, **tiny.image_size(pipe, shape), num_inference_steps=4, output_type="latent",
                  guidance_scale=4.0, generator=torch.Generator(device).manual_seed(0))
        return pipe(**kw, **more).images

    return pipe, call


def test_offload_before_or_after_wrap_samples_the_same_s2():
    pipe, call = _pipe()
    stock = call()
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS_4))
    s2 = call()
    s2fast.unwrap(pipe)
    model = pipe.transformer
    pipe.enable_model_cpu_offload(device="cpu")
    torch.testing.assert_close(call(), stock, **EXACT)  # offload alone changes nothing
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS_4))  # wrap under offload
    assert isinstance(model.__dict__["_old_forward"], ModelForward)  # beneath accelerate's forward
    torch.testing.assert_close(call(), s2, **EXACT)
    torch.testing.assert_close(call(), s2, **EXACT)  # the hooks are re-installed after every call: still beneath
    s2fast.unwrap(pipe)
    assert model._hf_hook is not None and binding.find(model) is None  # offload intact, s2fast gone
    torch.testing.assert_close(call(), stock, **EXACT)
    pipe.remove_all_hooks()
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS_4))
    pipe.enable_model_cpu_offload(device="cpu")  # offload after wrap
    assert isinstance(model.__dict__["_old_forward"], ModelForward)
    torch.testing.assert_close(call(), s2, **EXACT)
    s2fast.unwrap(pipe)
    torch.testing.assert_close(call(), stock, **EXACT)


def test_sequential_and_group_offloading_are_refused_with_the_reason():
    pipe, _ = _pipe()
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="AlignDevicesHook on .* module.*enable_sequential_cpu_offload.*twice a step"):
        s2fast.wrap(pipe, S2Config())
    assert s2fast.config_of(pipe) is None
    pipe, _ = _pipe()
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(ValueError, match="group offloading"):
        s2fast.wrap(pipe, S2Config())


def test_graphs_forced_on_are_refused_under_offload():
    pipe, _ = _pipe()
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="cuda_graphs=True cannot serve a transformer under enable_model_cpu_offload"):
        s2fast.wrap(pipe, S2Config(cuda_graphs=True))


@pytest.mark.gpu
def test_offload_on_a_gpu_keeps_its_memory_promise():
    pipe, call = _pipe("cuda")
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS_4, cuda_graphs=False))
    on_device = call()
    s2fast.unwrap(pipe)
    pipe.to("cpu")
    pipe.enable_model_cpu_offload(device="cuda")
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS_4))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    got = call()
    torch.cuda.synchronize()
    # the transformer went back to the CPU after the call, and nothing of s2fast's stayed on the GPU but the output
    assert next(pipe.transformer.parameters()).device.type == "cpu"
    assert torch.cuda.memory_allocated() - before <= got.numel() * got.element_size() + (1 << 20)
    assert s2fast.graph_stats(pipe) is None  # "auto" runs without graphs under offload
    torch.testing.assert_close(got, on_device, atol=2e-5, rtol=1e-5)  # same ops, same device: rounding at most
