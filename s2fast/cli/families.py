"""How the command calls each pipeline class it serves: which options it takes, which inputs it needs, whether it
makes videos, and which argument is λ.

Every option check here reads only what is known before any weights load: the pipeline class named by
model_index.json, its ``__call__`` signature, the index itself (Wan 2.2's second expert, a DiT's id2label) and,
for a local folder, the transformer's config.json (a class-conditional model's number of classes). The same
checks run on a loaded pipeline through :func:`ModelInfo.of_pipeline`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import UserError

# option (argparse dest) -> the pipeline call's parameter it fills
OPTION_PARAMETERS = {"negative_prompt": "negative_prompt", "height": "height", "width": "width",
                     "strength": "strength", "guidance_2": "guidance_scale_2", "mask": "mask_image",
                     "video": "video", "image": "image"}


@dataclass
class ModelInfo:
    """What the command knows of MODEL before loading it."""

    name: str                                   # as the user gave it
    class_name: str
    index: Dict = field(default_factory=dict)   # model_index.json
    transformer_config: Optional[Dict] = None   # transformer/config.json where readable without a download
    parameters: Tuple[str, ...] = ()            # the pipeline's __call__ parameters
    labels: Dict[str, int] = field(default_factory=dict)  # class name -> id (DiT's id2label)
    path: Optional[str] = None                  # the local folder, None for a hub id

    @classmethod
    def of_pipeline(cls, name: str, pipe) -> "ModelInfo":
        two = getattr(pipe, "transformer_2", None)
        index = {"transformer_2": [None, None] if two is None else ["diffusers", type(two).__name__]}
        return cls(name, type(pipe).__name__, index, dict(pipe.transformer.config),
                   tuple(inspect.signature(pipe.__call__).parameters), dict(getattr(pipe, "labels", None) or {}))

    @property
    def two_experts(self) -> bool:
        return any(self.index.get("transformer_2") or [None])


def labels_of(id2label: Optional[Dict]) -> Dict[str, int]:
    """DiTPipeline's label table: every comma-separated name of an id maps to it."""
    return {name.strip(): int(i) for i, names in (id2label or {}).items() for name in names.split(",")}


@dataclass(frozen=True)
class Family:
    """How the command calls one pipeline class.

    ``images``: how many ``--image`` it takes, (least, most); most None: any number (reference images).
    ``distilled``: guidance-distilled (no uncond branch): ``--guidance`` is the guidance embedding's scale and
    S² is D = C − ω(S − C)."""

    guidance_arg: str = "guidance_scale"
    class_conditional: bool = False
    video: bool = False
    negative_default: Optional[str] = None   # negative prompt used when CFG is on and none is given
    default_prompt: str = "a photo of a cat"  # for bench, when --prompt is not given
    images: Tuple[int, Optional[int]] = (0, 0)
    mask: bool = False
    video_input: bool = False
    distilled: bool = False
    strength: bool = False  # --strength: how far from the input the sample may move (image-/video-to-video)

    def options(self) -> List[str]:
        """The options this family takes beyond the common ones (for --help and the README)."""
        takes = []
        if self.images != (0, 0):
            least, most = self.images
            many = most is None or most > 1
            takes.append(("--image PATH" + (" (repeatable)" if many else "")) + ("" if least else " (optional)"))
        if self.mask:
            takes.append("--mask PATH")
        if self.video_input:
            takes.append("--video PATH")
        if self.strength:
            takes.append("--strength S")
        if self.video:
            takes.append("--frames N, --fps F" + (", --guidance-2 (two experts)" if not self.video_input else ""))
        if self.guidance_arg == "true_cfg_scale":
            takes.append("--guidance is its true_cfg_scale")
        return takes

    def check_options(self, info: ModelInfo, args) -> None:
        """Every option the pipeline cannot take and every input it needs but lacks: one line, before loading."""
        name = info.class_name
        if self.class_conditional:
            for option in ("negative_prompt", "height", "width"):
                if getattr(args, option, None) is not None:
                    flag = "--" + option.replace("_", "-")
                    raise UserError(f"{flag}: {name} is class-conditional with a fixed image size; it takes no {flag}")
        if getattr(args, "frames", None) is not None and not self.video:
            raise UserError(f"--frames: {name} makes images, not videos")
        if getattr(args, "fps", None) is not None and not self.video:
            raise UserError(f"--fps: {name} makes images, not videos")
        for option, parameter in OPTION_PARAMETERS.items():
            value = getattr(args, option, None)
            if value is None or value == []:
                continue
            flag = "--" + option.replace("_", "-")
            if parameter not in info.parameters:
                raise UserError(f"{flag}: {name} takes no {parameter}{_served_by(option)}")
        if getattr(args, "guidance_2", None) is not None and not info.two_experts:
            raise UserError(f"--guidance-2: {info.name} has one expert (no transformer_2 in its model_index.json); "
                            "--guidance-2 is the second expert's λ (Wan 2.2)")
        images = list(getattr(args, "image", None) or [])
        least, most = self.images
        if len(images) < least:
            raise UserError(f"--image: {name} needs an input image (--image PATH)")
        if most is not None and len(images) > most:
            raise UserError(f"--image: {name} takes {most} input image{'s' if most > 1 else ''}, got {len(images)}")
        if self.mask and getattr(args, "mask", None) is None:
            raise UserError(f"--mask: {name} needs a mask (--mask PATH: white where it repaints)")
        if self.video_input and getattr(args, "video", None) is None:
            raise UserError(f"--video: {name} needs an input video (--video PATH)")

    def guidance(self, pipe, args) -> float:
        """λ: the option, or the pipeline's own default."""
        if args.guidance is not None:
            return args.guidance
        default = inspect.signature(pipe.__call__).parameters[self.guidance_arg].default
        return None if default is None else float(default)

    def steps(self, pipe, args) -> int:
        if args.steps is not None:
            return args.steps
        return int(inspect.signature(pipe.__call__).parameters["num_inference_steps"].default)

    def fps(self, info: ModelInfo, args) -> Optional[int]:
        """Frames per second of the MP4: the option, else the model's (Wan 2.2 TI2V-5B, whose index sets
        expand_timesteps, makes 24 fps; the other Wan models 16)."""
        if not self.video:
            return None
        if getattr(args, "fps", None) is not None:
            return args.fps
        return 24 if info.index.get("expand_timesteps") else 16

    def condition(self, info: ModelInfo, prompt: str) -> Dict:
        """The call's conditioning for one prompt; UserError for a class name or id the pipeline does not have."""
        if not self.class_conditional:
            return {"prompt": prompt}
        return {"class_labels": [class_id(info, prompt)]}

    def call_kwargs(self, pipe, args, prompt: str, inputs: Optional[Dict] = None) -> Dict:
        """The pipeline call for one prompt: its conditioning, steps, λ and every option given; ``inputs``: the
        loaded images, mask and video (s2fast.cli.media.read_inputs)."""
        info = ModelInfo.of_pipeline(args.model, pipe)
        kwargs = dict(self.condition(info, prompt), num_inference_steps=self.steps(pipe, args))
        lam = self.guidance(pipe, args)
        if lam is not None:
            kwargs[self.guidance_arg] = lam
        negative = args.negative_prompt
        if negative is None and lam is not None and lam > 1:
            negative = self.negative_default
        if negative is not None:
            kwargs["negative_prompt"] = negative
        for option in ("height", "width", "strength", "guidance_2"):
            if getattr(args, option, None) is not None:
                kwargs[OPTION_PARAMETERS[option]] = getattr(args, option)
        if getattr(args, "frames", None) is not None and "num_frames" in info.parameters:
            kwargs["num_frames"] = args.frames
        kwargs.update(inputs or {})
        return kwargs


def _served_by(option: str) -> str:
    served = [name for name, f in FAMILIES.items() if _takes(f, option)]
    return f" (the pipelines that do: {', '.join(served)})" if served else ""


def _takes(family: Family, option: str) -> bool:
    return {"image": family.images != (0, 0), "mask": family.mask, "video": family.video_input,
            "strength": family.strength, "guidance_2": family.video and not family.video_input}.get(option, False)


_FLUX = dict(guidance_arg="true_cfg_scale", negative_default="")  # true CFG: on only with a negative prompt
_WAN = dict(video=True)

FAMILIES: Dict[str, Family] = {
    "StableDiffusion3Pipeline": Family(),
    "StableDiffusion3Img2ImgPipeline": Family(images=(1, 1), strength=True),
    "StableDiffusion3InpaintPipeline": Family(images=(1, 1), mask=True, strength=True),
    # Flux's guidance_scale is the distilled-guidance embedding; CFG with a negative branch is its true_cfg_scale,
    # on only when a negative prompt is given, so an empty one stands in when λ > 1 and none is given.
    "FluxPipeline": Family(**_FLUX),
    "FluxImg2ImgPipeline": Family(**_FLUX, images=(1, 1), strength=True),
    "FluxInpaintPipeline": Family(**_FLUX, images=(1, 1), mask=True, strength=True),
    "FluxKontextPipeline": Family(**_FLUX, images=(0, 1)),
    "FluxFillPipeline": Family(images=(1, 1), mask=True, strength=True, distilled=True),
    "DiTPipeline": Family(class_conditional=True, default_prompt="0"),
    "DigitsFlowPipeline": Family(class_conditional=True, default_prompt="7"),
    "WanPipeline": Family(**_WAN),
    "WanImageToVideoPipeline": Family(**_WAN, images=(1, 1)),
    "WanVideoToVideoPipeline": Family(**_WAN, video_input=True, strength=True),
    # Qwen-Image: true CFG when true_cfg_scale > 1 and a negative prompt is given (" " is the model card's)
    "QwenImagePipeline": Family(guidance_arg="true_cfg_scale", negative_default=" "),
    "QwenImageEditPlusPipeline": Family(guidance_arg="true_cfg_scale", negative_default=" ", images=(1, None)),
    "Flux2Pipeline": Family(images=(0, None), distilled=True),
    "Flux2KleinPipeline": Family(images=(0, None)),
    "ZImagePipeline": Family(),
}


def family_named(class_name: str) -> Family:
    if class_name not in FAMILIES:
        raise UserError(f"the s2fast command does not know how to call {class_name} (it knows {', '.join(FAMILIES)})")
    return FAMILIES[class_name]


def family_of(pipe) -> Family:
    return family_named(type(pipe).__name__)


def class_id(info: ModelInfo, prompt: str) -> int:
    """A class-conditional pipeline's class for ``prompt``: an id, or a label name (DiT's id2label). Where the
    number of classes is not known yet (a hub model before loading) an id is checked after loading."""
    config = info.transformer_config or {}
    num_classes = config.get("num_embeds_ada_norm")
    text = prompt.strip()
    if text.lstrip("-").isdigit():
        value = int(text)
        if value < 0 or (num_classes is not None and value >= num_classes):
            top = "" if num_classes is None else f"..{int(num_classes) - 1}"
            raise UserError(f"class id {value} is outside 0{top} for {info.class_name}")
        return value
    if not info.labels:
        top = "" if num_classes is None else f" in 0..{int(num_classes) - 1}"
        raise UserError(f"{info.class_name} has no class names (its model_index.json has no id2label): "
                        f"give a class id{top}, not {text!r}")
    if text not in info.labels:
        raise UserError(f"unknown class name {text!r} (one of the {len(info.labels)} names of the model's id2label, "
                        f"e.g. {', '.join(list(info.labels)[:3])})")
    return info.labels[text]
