"""CPU-first test setup. Nothing here touches CUDA at import.

TRITON_INTERPRET must be set before anything imports triton, so that Triton kernels run on CPU tensors in the
kernel tests; on a machine with a GPU the variable is left alone.
"""

import os
import shutil

import pytest

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- the two families every behavioural test runs on -------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import s2_reference  # noqa: E402

import s2fast  # noqa: E402
from s2fast import tiny  # noqa: E402


@dataclass
class Family:
    name: str
    pipe: object
    shape: object
    emb: dict
    size: dict
    scale_key: str              # the pipeline argument that is λ
    reference_loop: Callable
    num_blocks: int
    extra: dict = field(default_factory=dict)

    def kwargs(self, steps=4, lam=4.0, seed=0, cfg=True, **more):
        kw = dict(self.emb, **self.size, num_inference_steps=steps, output_type="latent",
                  generator=torch.Generator().manual_seed(seed), **self.extra)
        kw[self.scale_key] = lam if cfg else 1.0
        if not cfg:  # no negative embeddings: the pipelines then run cond only
            kw.pop("negative_prompt_embeds")
            kw.pop("negative_pooled_prompt_embeds")
        kw.update(more)
        return kw

    def __call__(self, **kw):
        return self.pipe(**self.kwargs(**kw)).images

    def reference(self, masks, *, steps=4, lam=4.0, omega=0.25, seed=0, cfg=True, num_masks=1):
        return self.reference_loop(self.pipe, self.emb, masks, steps=steps, lam=lam, omega=omega, seed=seed,
                                   cfg=cfg, num_masks=num_masks, **self.size)


def _sd3():
    shape = tiny.SD3Shape()
    pipe = tiny.sd3_pipeline(shape)
    return Family("sd3", pipe, shape, tiny.embeddings(shape), tiny.image_size(pipe, shape), "guidance_scale",
                  s2_reference.sd3_three_pass, shape.num_layers)


def _flux():
    shape = tiny.FluxShape()
    pipe = tiny.flux_pipeline(shape)
    return Family("flux", pipe, shape, tiny.embeddings(shape), tiny.image_size(pipe, shape), "true_cfg_scale",
                  s2_reference.flux_three_pass, shape.num_layers + shape.num_single_layers)


_BUILDERS = {"sd3": _sd3, "flux": _flux}


@pytest.fixture(scope="session")
def families():
    return {}


def _shared(families, name):
    """The family's tiny pipeline, built once per session; unwrapped again after every test that uses it."""
    if name not in families:
        families[name] = _BUILDERS[name]()
    yield families[name]
    pipe = families[name].pipe
    s2fast.unwrap(pipe)
    # A test that added and removed a diffusers hook (or a cache) leaves the model's own forward as an instance
    # attribute, as diffusers does; the next test starts from a model nobody touched.
    for module in pipe.transformer.modules():
        forward = module.__dict__.get("forward")
        if forward is not None and getattr(forward, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]


@pytest.fixture(params=["sd3", "flux"])
def family(request, families):
    """A tiny pipeline of each supported family."""
    yield from _shared(families, request.param)


@pytest.fixture
def sd3(families):
    yield from _shared(families, "sd3")


@pytest.fixture
def flux(families):
    yield from _shared(families, "flux")
