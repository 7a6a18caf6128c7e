"""Loading MODEL, and how each supported pipeline family is called from the command's options.

MODEL is ``digits`` (the embedded default), a local diffusers folder, or a hub id. Local folders load with
``local_files_only``; only a hub id lets diffusers download (into its own cache; with HF_HUB_OFFLINE=1 it reads
the cache only). Every failure a user can cause is a UserError with one line naming the problem.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Dict, Optional

import torch

from .errors import UserError
from .families import FAMILIES, ModelInfo, family_of, labels_of  # noqa: F401  (family_of: for the subcommands)

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
    """Refuse, before any weights load, a pipeline s2fast does not support or the command does not know how to call."""
    supported = _supported_names()
    if class_name not in supported:
        raise UserError(f"{model} is a {class_name or 'pipeline of unknown class'}, which s2fast does not support "
                        f"(supported: {', '.join(supported)})")
    if class_name not in FAMILIES:
        raise UserError(f"{model} is a {class_name}: s2fast.wrap supports it from Python, but the s2fast command "
                        f"does not know how to call it (it runs {', '.join(FAMILIES)})")


def inspect_model(model: str) -> ModelInfo:
    """What MODEL is, from its model_index.json (and a local folder's transformer config), without loading weights:
    UserError when it is missing, unreadable or not a pipeline the command runs."""
    if model == "digits":
        from s2fast.digits.pipeline import DEFAULT_WEIGHTS

        return _info(model, DEFAULT_WEIGHTS)
    if os.path.isdir(os.path.expanduser(model)):
        return _info(model, os.path.expanduser(model))
    if _looks_like_path(model):
        raise UserError(f"no model folder at {model}")
    index = _hub_index(model)
    _check_class(index.get("_class_name"), model)
    cls = _pipeline_class(index["_class_name"])
    return ModelInfo(model, index["_class_name"], index, None, tuple(inspect.signature(cls.__call__).parameters),
                     labels_of(index.get("id2label")))


def _info(model: str, path: str) -> ModelInfo:
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise UserError(f"{model} is not a diffusers pipeline folder (it has no model_index.json)")
    index = _read_json(index_path)
    class_name = index.get("_class_name")
    _check_class(class_name, model)
    config_path = os.path.join(path, "transformer", "config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else None
    cls = _pipeline_class(class_name)
    return ModelInfo(model, class_name, index, config, tuple(inspect.signature(cls.__call__).parameters),
                     labels_of(index.get("id2label")), path)


def _read_json(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {_first_line(e)}") from None


def _hub_index(model: str) -> Dict:
    """A hub model's model_index.json through diffusers' loading and cache. Where it is not cached and the hub
    cannot be reached, one line says so at once (huggingface_hub would retry for half a minute, then report a
    missing file)."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants, try_to_load_from_cache

    unreachable = f"cannot load {model!r}: it is not in the local cache, and the hub cannot be reached"
    cached = isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    if not cached and constants.HF_HUB_OFFLINE:
        raise UserError(f"cannot load {model!r}: it is not in the local cache, and HF_HUB_OFFLINE is set")
    if not cached and not _hub_reachable(constants.ENDPOINT):
        raise UserError(unreachable)
    try:
        return DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as e:  # not found, gated, malformed id
        if type(e.__context__).__name__ == "LocalEntryNotFoundError":
            raise UserError(unreachable) from None
        raise UserError(f"cannot load {model!r} from the hub or its cache: {_first_line(e)}") from None


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint opens (one try). Behind a proxy the answer is left to the
    download itself."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def load_pipeline(info: ModelInfo, dtype: torch.dtype):
    """The pipeline ``info`` describes (``inspect_model``), on the CPU in ``dtype``; UserError when it cannot be
    loaded."""
    if info.name == "digits":
        from s2fast.digits import load_default_pipeline

        return load_default_pipeline(dtype=dtype)
    cls = _pipeline_class(info.class_name)
    if info.path is not None:
        return _from_pretrained(cls, info.path, info.name, dtype, local_files_only=True)
    return _from_pretrained(cls, info.name, info.name, dtype)


def _pipeline_class(class_name: str):
    if class_name == "DigitsFlowPipeline":  # the project's own class, which diffusers' loader does not know
        from s2fast.digits import DigitsFlowPipeline

        return DigitsFlowPipeline
    import diffusers

    return getattr(diffusers, class_name)


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
    # and the pipeline's own settings that are no component (Wan 2.2's boundary_ratio and expand_timesteps,
    # Flux.2 Klein's is_distilled): without them the sibling would sample another way
    for name in inspect.signature(type(pipe).__init__).parameters:
        if name not in components and name in pipe.config:
            components[name] = pipe.config[name]
    other = type(pipe)(**components)
    for name in ("labels",):  # DiT's class names live on the instance, not among the components
        if hasattr(pipe, name):
            setattr(other, name, getattr(pipe, name))
    other.set_progress_bar_config(disable=True)
    return other


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
