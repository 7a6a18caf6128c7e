"""DigitsFlowPipeline: class-conditional flow matching in pixel space with a DiTTransformer2DModel.

Shaped like diffusers' DiTPipeline (class labels in, [cond, null class] rows in one transformer call, the same CFG
line), with a FlowMatchEulerDiscreteScheduler and no VAE: the model denoises 28×28 MNIST pixels directly. The null
class is ``transformer.config.num_embeds_ada_norm`` (diffusers' LabelEmbedding appends it after the classes), not
DiTPipeline's hard-coded ImageNet 1000. The loop keeps x_t in ``latents`` and the timestep in ``t``, as SD3's does,
so s2fast's fused step applies to it.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..adapters import register_adapter
from .adapter import DigitsAdapter

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights")


class DigitsFlowPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    def _class_tensor(self, class_labels) -> torch.Tensor:
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.numel() == 0 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be a non-empty list of ints, got {class_labels!r}")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"class_labels must lie in 0..{self.num_classes - 1}, got {labels.tolist()}")
        return labels.to(self._execution_device, torch.long)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, Sequence[int], torch.Tensor],
        guidance_scale: float = 4.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: int = 28,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),  # accepted for diffusers' signature
    ):
        """Sample one digit per entry of ``class_labels`` (0..9).

        ``guidance_scale`` > 1 runs CFG against the null class, as DiTPipeline does. ``output_type`` is "pil",
        "np" (N, 28, 28, 1 in [0, 1]) or "pt" (N, 1, 28, 28 in [0, 1]). ``callback_on_step_end(pipe, i, t,
        {"latents": ...})`` runs after every step, as in SD3's pipeline.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only hold {self._callback_tensor_inputs}, "
                             f"got {sorted(unknown)}")
        class_labels = self._class_tensor(class_labels)
        batch_size = len(class_labels)
        latent_size = self.transformer.config.sample_size
        latent_channels = self.transformer.config.in_channels
        shape = (batch_size, latent_channels, latent_size, latent_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.transformer.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(self._execution_device, self.transformer.dtype)
        do_cfg = guidance_scale > 1
        class_null = torch.full_like(class_labels, self.num_classes)
        class_labels_input = torch.cat([class_labels, class_null]) if do_cfg else class_labels

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
                timestep = t.expand(latent_model_input.shape[0])
                noise_pred = self.transformer(latent_model_input, timestep=timestep, class_labels=class_labels_input).sample
                if do_cfg:
                    cond, uncond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {k: latents for k in callback_on_step_end_tensor_inputs}  # "latents" only (checked)
                    outputs = callback_on_step_end(self, i, t, tensors) or {}
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        samples = (latents.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            samples = samples.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                samples = self.numpy_to_pil(samples)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=samples) if return_dict else (samples,)


def balanced_labels(n: int) -> torch.Tensor:
    """``n`` class labels, 0 to 9 in turn (n a positive multiple of 10): the demo's balanced classes."""
    if n < 10 or n % 10:
        raise ValueError(f"the sample count must be a positive multiple of 10 (balanced classes), got {n}")
    return torch.arange(10).repeat(n // 10)


def load_default_pipeline(path: Optional[str] = None, dtype: torch.dtype = torch.float32) -> DigitsFlowPipeline:
    """The embedded default (trained by ``python -m s2fast_eval.digits.train`` from the repository's evaluation
    folder), loaded offline from the package."""
    path = path or DEFAULT_WEIGHTS
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"no trained digits pipeline at {path} (train one from a checkout of the repository: "
                                "PYTHONPATH=evaluation python -m s2fast_eval.digits.train)")
    pipe = DigitsFlowPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Through the public registry, as any project's own pipeline would: s2fast.wrap then supports this class.
register_adapter(DigitsFlowPipeline, DigitsAdapter)
