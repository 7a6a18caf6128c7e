"""Loading MODEL, and how each supported pipeline family is called from the command's options.

MODEL is ``digits`` (the embedded default), a local diffusers folder, or a hub id. Local folders load with
``local_files_only``; only a hub id lets diffusers download (into its own cache; with HF_HUB_OFFLINE=1 it reads
the cache only). Every failure a user can cause is a UserError with one line naming the problem.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(requested: Optional[str]) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise UserError(f"--device {requested!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: torch sees no CUDA device here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU kernels for bf16/fp16 are slow or missing


def _looks_like_path(model: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else is meant as a folder.
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or model.endswith("/")


def _supported_names():
    import s2fast.digits  # noqa: F401  (registers DigitsFlowPipeline)
    from s2fast.adapters import supported_pipelines

    return supported_pipelines()


def _check_class(class_name: Optional[str], model: str) -> None:
    """Refuse, before any weights load, a pipeline s2fast does not support or the command does not know how to call
    (s2fast.wrap serves more pipelines than the command: image-to-image, inpainting and newer families take inputs
    the command has no options for)."""
    supported = _supported_names()
    if class_name not in supported:
        raise UserError(f"{model} is a {class_name or 'pipeline of unknown class'}, which s2fast does not support "
                        f"(supported: {', '.join(supported)})")
    if class_name not in FAMILIES:
        raise UserError(f"{model} is a {class_name}: s2fast.wrap supports it from Python, but the s2fast command "
                        f"does not know how to call it (it runs {', '.join(FAMILIES)})")


def load_pipeline(model: str, dtype: torch.dtype):
    """The pipeline MODEL names, on the CPU in ``dtype``; UserError when it cannot be loaded or is not supported."""
    from diffusers import DiffusionPipeline

    if model == "digits":
        from s2fast.digits import load_default_pipeline

        return load_default_pipeline(dtype=dtype)
    if os.path.isdir(os.path.expanduser(model)):
        path = os.path.expanduser(model)
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise UserError(f"{model} is not a diffusers pipeline folder (it has no model_index.json)")
        try:
            with open(index) as f:
                class_name = json.load(f).get("_class_name")
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {index}: {e}") from None
        _check_class(class_name, model)
        return _from_pretrained(_pipeline_class(class_name, DiffusionPipeline), path, model, dtype, local_files_only=True)
    if _looks_like_path(model):
        raise UserError(f"no model folder at {model}")
    # A hub id: diffusers' own loading and cache. The index alone first, to refuse an unsupported pipeline before
    # its weights are fetched.
    try:
        class_name = DiffusionPipeline.load_config(model).get("_class_name")
    except (OSError, ValueError) as e:  # not found, offline without a cached copy, gated, malformed id
        raise UserError(f"cannot load {model!r} from the hub or its cache: {_first_line(e)}") from None
    _check_class(class_name, model)
    return _from_pretrained(_pipeline_class(class_name, DiffusionPipeline), model, model, dtype)


def _pipeline_class(class_name: str, default):
    if class_name == "DigitsFlowPipeline":  # the project's own class, which diffusers' loader does not know
        from s2fast.digits import DigitsFlowPipeline

        return DigitsFlowPipeline
    return default


def _from_pretrained(cls, where: str, model: str, dtype, **kwargs):
    try:
        pipe = cls.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load {model}: {_first_line(e)}") from None
    return pipe


def sibling(pipe):
    """A second pipeline of the same class over the same models (its own scheduler, whose state is per call).

    It lets one method run stock while the other stays wrapped: a call from a pipeline that is not the wrapped one
    takes the model's stock forward. Unwrapping between calls instead would release s2fast's block graphs, and
    every S² call would capture them anew."""
    components = dict(pipe.components, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config))
    other = type(pipe)(**components)
    for name in ("labels",):  # DiT's class names live on the instance, not among the components
        if hasattr(pipe, name):
            setattr(other, name, getattr(pipe, name))
    other.set_progress_bar_config(disable=True)
    return other


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# --- how each family is called -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How the command calls one pipeline class: its guidance argument, whether it takes text or class labels,
    and whether it makes videos."""

    guidance_arg: str = "guidance_scale"
    class_conditional: bool = False
    video: bool = False
    negative_default: Optional[str] = None   # negative prompt used when CFG is on and none is given (Flux)
    default_prompt: str = "a photo of a cat"  # for bench, when --prompt is not given

    def check_options(self, pipe, args) -> None:
        name = type(pipe).__name__
        if self.class_conditional:
            for option in ("negative_prompt", "height", "width"):
                if getattr(args, option) is not None:
                    flag = "--" + option.replace("_", "-")
                    raise UserError(f"{flag}: {name} is class-conditional with a fixed image size; it takes no {flag}")
        if args.frames is not None and not self.video:
            raise UserError(f"--frames: {name} makes images, not videos")

    def guidance(self, pipe, args) -> float:
        """λ: the option, or the pipeline's own default."""
        if args.guidance is not None:
            return args.guidance
        return float(inspect.signature(pipe.__call__).parameters[self.guidance_arg].default)

    def steps(self, pipe, args) -> int:
        if args.steps is not None:
            return args.steps
        return int(inspect.signature(pipe.__call__).parameters["num_inference_steps"].default)

    def condition(self, pipe, prompt: str) -> Dict:
        """The call's conditioning for one prompt; UserError for a class name or id the pipeline does not have."""
        if not self.class_conditional:
            return {"prompt": prompt}
        return {"class_labels": [class_id(pipe, prompt)]}

    def call_kwargs(self, pipe, args, prompt: str) -> Dict:
        kwargs = dict(self.condition(pipe, prompt), num_inference_steps=self.steps(pipe, args))
        lam = self.guidance(pipe, args)
        kwargs[self.guidance_arg] = lam
        negative = args.negative_prompt
        if negative is None and lam > 1:
            negative = self.negative_default
        if negative is not None:
            kwargs["negative_prompt"] = negative
        for option in ("height", "width"):
            if getattr(args, option) is not None:
                kwargs[option] = getattr(args, option)
        if args.frames is not None:
            kwargs["num_frames"] = args.frames
        return kwargs


FAMILIES: Dict[str, Family] = {
    "StableDiffusion3Pipeline": Family(),
    # Flux's guidance_scale is the distilled-guidance embedding; CFG with a negative branch is its true_cfg_scale,
    # on only when a negative prompt is given, so an empty one stands in when λ > 1 and none is given.
    "FluxPipeline": Family(guidance_arg="true_cfg_scale", negative_default=""),
    "DiTPipeline": Family(class_conditional=True, default_prompt="0"),
    "DigitsFlowPipeline": Family(class_conditional=True, default_prompt="7"),
}


def family_of(pipe) -> Family:
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise UserError(f"the s2fast command does not know how to call {name} (it knows {', '.join(FAMILIES)})")
    return FAMILIES[name]


def class_id(pipe, prompt: str) -> int:
    """A class-conditional pipeline's class for ``prompt``: an id, or a label name (DiT's ``get_label_ids``)."""
    num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
    text = prompt.strip()
    if text.lstrip("-").isdigit():
        value = int(text)
        if not 0 <= value < num_classes:
            raise UserError(f"class id {value} is outside 0..{num_classes - 1} for {type(pipe).__name__}")
        return value
    labels = getattr(pipe, "labels", None) or {}
    if not labels:
        raise UserError(f"{type(pipe).__name__} has no class names (its model_index.json has no id2label): "
                        f"give a class id in 0..{num_classes - 1}, not {text!r}")
    if text not in labels:
        raise UserError(f"unknown class name {text!r} (one of the {len(labels)} names of the model's id2label, "
                        f"e.g. {', '.join(list(labels)[:3])})")
    return pipe.get_label_ids([text])[0]
