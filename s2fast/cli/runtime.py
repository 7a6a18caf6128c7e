"""What a command run needs around the pipeline: the processes it runs in, a per-step clock, and the record of the
software and device it ran on."""

from __future__ import annotations

import inspect
import os
import platform
import sys
import time
from importlib import metadata
from typing import Dict, List, Optional, Sequence

import torch

from .errors import UserError


class Processes:
    """The processes of this run. Launched by ``accelerate launch`` or ``torchrun`` (WORLD_SIZE > 1), accelerate's
    PartialState sets up the process group (gloo on the CPU, nccl on GPUs) and gives each process its own device;
    otherwise this is the only process and nothing distributed is imported."""

    def __init__(self, device: Optional[str]):
        self.state = None
        self.index, self.count = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import PartialState
            except ImportError:
                raise UserError("running under a multi-process launcher needs accelerate (pip install accelerate)") from None
            cpu = device == "cpu" or not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)
            self.index, self.count = self.state.process_index, self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, requested: Optional[str]) -> Optional[str]:
        """Each process's device: its own GPU under a launcher (a requested 'cuda' means that one), else as asked."""
        if self.state is None or requested == "cpu":
            return requested
        return str(self.state.device)

    def split(self, items: Sequence) -> List:
        """This process's share of ``items``: contiguous slices, every item in exactly one process's share."""
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as mine:
            return list(mine)

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def main_first(self):
        """A context in which the main process runs first (one download into the hub cache, then the others read it)."""
        if self.state is None:
            import contextlib

            return contextlib.nullcontext()
        return self.state.main_process_first()


class StepClock:
    """Stamps every denoising step of one pipeline call: by the pipeline's own ``callback_on_step_end`` where its
    ``__call__`` takes one, else (DiTPipeline) after each denoiser call. On CUDA each stamp waits for the device,
    so a step's time is its work, not its launch."""

    def __init__(self, pipe, device: torch.device):
        self.pipe = pipe
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.uses_callback = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
        self.stamps: List[float] = []
        self._hook = None

    def _stamp(self, *_args):
        self.sync()
        self.stamps.append(time.perf_counter())

    def _callback(self, _pipe, _i, _t, tensors):
        self._stamp()
        return tensors

    def __enter__(self) -> Dict:
        """Starts the clock; returns the call arguments it needs."""
        self.sync()
        self.stamps = [time.perf_counter()]
        if self.uses_callback:
            return {"callback_on_step_end": self._callback}
        self._hook = self.pipe.transformer.register_forward_hook(lambda *a: self._stamp())
        return {}

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._stamp()
        self.total = self.stamps[-1] - self.stamps[0]

    @property
    def step_times(self) -> List[float]:
        """Seconds per step; the first includes the call's set-up (text encoding, timesteps)."""
        stamps = self.stamps[:-1]  # the last stamp closes the call (decoding, post-processing)
        return [b - a for a, b in zip(stamps, stamps[1:])]


def versions() -> Dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("s2fast", "torch", "diffusers", "transformers", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_record(device: torch.device, dtype: torch.dtype, processes: Processes) -> Dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {"device": str(device), "name": name, "dtype": str(dtype).replace("torch.", ""),
            "processes": processes.count, "platform": sys.platform}
