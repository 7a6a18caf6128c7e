"""Registry of supported model families: pipeline class name -> adapter, imported lazily."""

from __future__ import annotations

import importlib

# pipeline class name -> (module, adapter class). One file per family; the engine never names one.
_FAMILIES = {
    "StableDiffusion3Pipeline": ("s2fast.adapters.sd3", "SD3Adapter"),
    "FluxPipeline": ("s2fast.adapters.flux", "FluxAdapter"),
    "DiTPipeline": ("s2fast.adapters.dit", "DiTAdapter"),
    "DigitsFlowPipeline": ("s2fast.adapters.dit", "DigitsAdapter"),  # s2fast.digits, the embedded default
}

SUPPORTED_PIPELINES = tuple(_FAMILIES)


def adapter_for(pipe):
    """The adapter for ``pipe``'s family; ValueError naming the supported pipelines otherwise.

    Matched by exact class name: a sibling such as StableDiffusion3Img2ImgPipeline has another denoising loop.
    """
    name = type(pipe).__name__
    if name not in _FAMILIES:
        raise ValueError(
            f"s2fast does not support {name}; supported pipelines: {', '.join(SUPPORTED_PIPELINES)}"
        )
    module, cls = _FAMILIES[name]
    adapter = getattr(importlib.import_module(module), cls)()
    model = getattr(pipe, "transformer", None)
    model_name = type(model).__name__
    if model_name not in adapter.model_classes:
        raise ValueError(
            f"s2fast: {name}.transformer is a {model_name}, expected {' or '.join(adapter.model_classes)} "
            "(a torch.compile'd or otherwise wrapped transformer is not supported; wrap before compiling)"
        )
    return adapter
