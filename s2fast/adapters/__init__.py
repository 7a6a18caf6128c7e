"""Registry of supported pipelines: pipeline class -> adapter. The built-in families are diffusers pipelines,
named here and imported lazily; any other pipeline class joins through :func:`register_adapter`."""

from __future__ import annotations

import importlib
import inspect
from typing import Dict, Tuple, Type, Union

from .base import FamilyAdapter

# diffusers pipeline class name -> (module, adapter class). One file per family; the engine never names one.
_FAMILIES = {
    "StableDiffusion3Pipeline": ("s2fast.adapters.sd3", "SD3Adapter"),
    "StableDiffusion3Img2ImgPipeline": ("s2fast.adapters.sd3_siblings", "SD3Img2ImgAdapter"),
    "StableDiffusion3InpaintPipeline": ("s2fast.adapters.sd3_siblings", "SD3InpaintAdapter"),
    "FluxPipeline": ("s2fast.adapters.flux", "FluxAdapter"),
    "FluxImg2ImgPipeline": ("s2fast.adapters.flux_siblings", "FluxImg2ImgAdapter"),
    "FluxInpaintPipeline": ("s2fast.adapters.flux_siblings", "FluxInpaintAdapter"),
    "FluxFillPipeline": ("s2fast.adapters.flux_siblings", "FluxFillAdapter"),
    "FluxKontextPipeline": ("s2fast.adapters.flux_siblings", "FluxKontextAdapter"),
    "DiTPipeline": ("s2fast.adapters.dit", "DiTAdapter"),
    "WanPipeline": ("s2fast.adapters.wan", "WanAdapter"),
    "WanImageToVideoPipeline": ("s2fast.adapters.wan", "WanAdapter"),
    "WanVideoToVideoPipeline": ("s2fast.adapters.wan", "WanVideoToVideoAdapter"),
    "QwenImagePipeline": ("s2fast.adapters.qwenimage", "QwenImageAdapter"),
    "QwenImageEditPlusPipeline": ("s2fast.adapters.qwenimage", "QwenImageAdapter"),
    "Flux2Pipeline": ("s2fast.adapters.flux2", "Flux2Adapter"),
    "Flux2KleinPipeline": ("s2fast.adapters.flux2", "Flux2KleinAdapter"),
    "ZImagePipeline": ("s2fast.adapters.zimage", "ZImageAdapter"),
}
_REGISTERED: Dict[type, type] = {}  # pipeline class -> adapter class, from register_adapter

DIFFUSERS_PIPELINES = tuple(_FAMILIES)


def supported_pipelines() -> Tuple[str, ...]:
    """The names of every pipeline class s2fast can wrap now: diffusers' built-in ones, then the registered ones."""
    return DIFFUSERS_PIPELINES + tuple(cls.__name__ for cls in _REGISTERED)


def register_adapter(pipeline_class: type, adapter_class: type, *, replace: bool = False) -> None:
    """Teach :func:`s2fast.wrap` a pipeline class: ``adapter_class`` (a subclass of
    ``s2fast.adapters.base.FamilyAdapter`` implementing every abstract method) drives pipelines whose class is
    exactly ``pipeline_class``. Registering a class again raises unless ``replace=True``; a diffusers pipeline that
    s2fast supports itself cannot be replaced.

    The project's own digits pipeline (``s2fast.digits.DigitsFlowPipeline``) registers itself this way.
    """
    if not inspect.isclass(pipeline_class):
        raise TypeError(f"register_adapter: pipeline_class must be a class, got {pipeline_class!r}")
    if not (inspect.isclass(adapter_class) and issubclass(adapter_class, FamilyAdapter)):
        raise TypeError(f"register_adapter: adapter_class must be a FamilyAdapter subclass, got {adapter_class!r}")
    missing = sorted(getattr(adapter_class, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"register_adapter: {adapter_class.__name__} does not implement {', '.join(missing)}")
    if pipeline_class.__name__ in _FAMILIES and pipeline_class.__module__.startswith("diffusers"):
        raise ValueError(f"register_adapter: s2fast supports {pipeline_class.__name__} itself")
    if pipeline_class in _REGISTERED and not replace and _REGISTERED[pipeline_class] is not adapter_class:
        raise ValueError(f"register_adapter: {pipeline_class.__name__} already has the adapter "
                         f"{_REGISTERED[pipeline_class].__name__} (pass replace=True to replace it)")
    _REGISTERED[pipeline_class] = adapter_class


def adapter_class_for(pipeline_class: type) -> Union[Type, None]:
    """The adapter class registered for ``pipeline_class`` (exact class), or None."""
    if pipeline_class in _REGISTERED:
        return _REGISTERED[pipeline_class]
    name = pipeline_class.__name__
    if name in _FAMILIES and pipeline_class.__module__.startswith("diffusers"):
        module, cls = _FAMILIES[name]
        return getattr(importlib.import_module(module), cls)
    return None


def adapter_for(pipe):
    """The adapter for ``pipe``'s family; ValueError naming the supported pipelines otherwise.

    Matched by exact class: each sibling of a family (StableDiffusion3Img2ImgPipeline, FluxKontextPipeline) has a
    denoising loop of its own, and so an adapter (and registry line) of its own.
    """
    adapter_class = adapter_class_for(type(pipe))
    if adapter_class is None:
        raise ValueError(f"s2fast does not support {type(pipe).__name__}; supported pipelines: "
                         f"{', '.join(supported_pipelines())} (s2fast.register_adapter adds one)")
    adapter = adapter_class()
    present = [name for name in adapter.denoisers if getattr(pipe, name, None) is not None]
    # A pipeline may be built without one of its experts (Wan 2.1 has no transformer_2; Wan 2.2 can load the
    # low-noise expert alone), but it needs at least one denoiser.
    for name in present or adapter.denoisers[:1]:
        check_model(adapter, pipe, name, getattr(pipe, name, None))
    return adapter


def check_model(adapter, pipe, name: str, model) -> None:
    """ValueError unless ``model`` (the pipeline's attribute ``name``) is a model class ``adapter`` drives."""
    model_name = type(model).__name__
    if model_name not in adapter.model_classes:
        raise ValueError(
            f"s2fast: {type(pipe).__name__}.{name} is a {model_name}, expected {' or '.join(adapter.model_classes)} "
            "(a torch.compile'd or otherwise wrapped transformer is not supported; wrap before compiling)"
        )
    adapter.check_denoiser(model)
