"""Which transformer families the modular guiders serve, and how a modular loop's guider batch maps to the
transformer's arguments.

A modular denoise step builds one batch per guider prediction (``guider.prepare_inputs``) and calls the transformer
with each, naming the arguments after the batch's fields; SD3's step is the one exception here, whose pooled text
embedding travels as ``text_embeds`` and reaches the transformer as ``pooled_projections``. The guider serves a
family through the model half of its s2fast adapter (s2fast/adapters/), looked up by the transformer's class name.
A family joins with one line in ``_FAMILIES`` (or :func:`register_modular_family`) and a row in the guider tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, Tuple


@dataclass(frozen=True)
class ModularFamily:
    """How the guiders serve one transformer class inside its modular denoise loop.

    ``adapter``: ``"module:Class"`` of the s2fast adapter whose model half (blocks, embed, run_block, head) runs
    the transformer. ``field_arguments``: guider batch fields whose transformer argument has another name.
    ``extra_inputs``: transformer arguments the adapter reads beyond its ``batched_inputs`` and its attention
    kwargs. Any other argument the loop passes is refused, naming it: the engine would otherwise ignore it.
    ``cond_norm_rescale``: the loop rescales the guider's ``pred`` to ``pred_cond``'s norm per token after the
    guider (Qwen-Image's loop does, always). The family's classic pipeline does that rescale only where it runs
    CFG, so the guider reports its own ``pred`` as ``pred_cond`` where CFG is off (λ = 1 or disabled): the
    loop's rescale is then exactly 1 and the result is D, as under s2fast.wrap.
    """

    adapter: str
    field_arguments: Dict[str, str] = field(default_factory=dict)
    extra_inputs: Tuple[str, ...] = ()
    cond_norm_rescale: bool = False
    # the loop passes per-sample lists (Z-Image: ``x`` a list of [C, 1, H, W] latents, ``t``, ``cap_feats`` a list of
    # caption features) and stacks the list it gets back: the adapter's inputs are ``hidden_states`` (the stacked
    # latents) and ``timestep``, and the answer is the prediction as a list of samples
    sample_lists: bool = False

    def adapter_class(self):
        module, name = self.adapter.split(":")
        return getattr(importlib.import_module(module), name)

    def argument(self, batch_field: str) -> str:
        return self.field_arguments.get(batch_field, batch_field)


# transformer class name -> family. The diffusers 0.42 modular loops: stable_diffusion_3/denoise.py
# (StableDiffusion3LoopDenoiser), wan/denoise.py (WanLoopDenoiser, Wan22LoopDenoiser: one guider per expert) and
# qwenimage/denoise.py (QwenImageLoopDenoiser: img_shapes reaches the transformer beside the guider's fields, and
# the loop rescales the guided prediction to the cond one's norm), flux2/denoise.py (Flux2KleinBaseLoopDenoiser, the
# one Flux.2 loop with a guider: txt_ids is a guider field, img_ids goes beside; Flux2LoopDenoiser and
# Flux2KleinLoopDenoiser, for the guidance-distilled models, call the transformer once per step without a guider) and
# z_image/denoise.py (ZImageLoopDenoiser: per-sample lists, negated predictions, ClassifierFreeGuidance's own CFG
# line: it has no cfg_normalization or cfg_truncation, which only the classic ZImagePipeline does).
_FAMILIES: Dict[str, ModularFamily] = {
    "SD3Transformer2DModel": ModularFamily("s2fast.adapters.sd3:SD3Adapter", {"text_embeds": "pooled_projections"}),
    "WanTransformer3DModel": ModularFamily("s2fast.adapters.wan:WanAdapter"),
    "QwenImageTransformer2DModel": ModularFamily("s2fast.adapters.qwenimage:QwenImageAdapter",
                                                 extra_inputs=("img_shapes",), cond_norm_rescale=True),
    "Flux2Transformer2DModel": ModularFamily("s2fast.adapters.flux2:Flux2Adapter", extra_inputs=("img_ids", "txt_ids")),
    "ZImageTransformer2DModel": ModularFamily("s2fast.adapters.zimage:ZImageAdapter",
                                              extra_inputs=("patch_size", "f_patch_size"), sample_lists=True),
}


def register_modular_family(model_class_name: str, family: ModularFamily, *, replace: bool = False) -> None:
    """Serve transformers of class ``model_class_name`` with the modular guiders (S2Guidance, SGGGuidance)."""
    if not isinstance(model_class_name, str) or not model_class_name:
        raise TypeError(f"register_modular_family: model_class_name must be a class name, got {model_class_name!r}")
    if not isinstance(family, ModularFamily):
        raise TypeError(f"register_modular_family: family must be a ModularFamily, got {type(family).__name__}")
    if model_class_name in _FAMILIES and not replace and _FAMILIES[model_class_name] != family:
        raise ValueError(f"register_modular_family: {model_class_name} is served already (pass replace=True)")
    _FAMILIES[model_class_name] = family


def supported_transformers() -> Tuple[str, ...]:
    return tuple(_FAMILIES)


def family_for(model, guider_name: str) -> ModularFamily:
    """The family serving ``model`` (matched by its exact class name); ValueError naming the class otherwise."""
    name = type(model).__name__
    family = _FAMILIES.get(name)
    if family is None:
        raise ValueError(
            f"s2fast.{guider_name} cannot serve a {name}: s2fast has no adapter for its family in modular pipelines "
            f"(supported transformers: {', '.join(_FAMILIES)}). Use diffusers' own guiders with it, or register "
            "an adapter with s2fast.guiders.register_modular_family")
    return family
