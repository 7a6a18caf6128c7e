"""s2fast: S²-Guidance sampling for diffusers pipelines at the cost of the arithmetic it needs.

    cfg = s2fast.S2Config(omega=0.25)
    s2fast.wrap(pipe, cfg)     # the pipeline's own call now samples with S²-Guidance
    s2fast.trace(pipe)         # the masks of the last call
    s2fast.trace_denoisers(pipe)   # beside it: which expert ran each step (Wan 2.2's two)
    s2fast.trace_steps(pipe)   # and what each step ran (sub-networks computed, or their correction reused)
    s2fast.unwrap(pipe)        # restores the pipeline exactly
    s2fast.wrap(pipe, s2fast.SGGConfig())   # segmented guidance: CFG, then skip-layer guidance
    s2fast.register_adapter(MyPipeline, MyAdapter)   # teach wrap another pipeline class
    pipe.update_components(guider=s2fast.S2Guidance(7.0, s2fast.S2Config()))   # a modular pipeline's guider

Importing s2fast is cheap: torch and diffusers are imported when wrap is first used.
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

from .config import S2Config
from .sgg import SGGConfig


def _kernels_of_this_checkout() -> None:
    """In a source checkout, kernels/ (installed as s2fast.kernels) sits beside this package, and an editable
    install maps the name to it through a finder of its own; a second editable install of another checkout would
    then serve its kernels with this s2fast. A finder first in line answers s2fast.kernels from this checkout.
    Installed from a wheel, s2fast/kernels/ is an ordinary subpackage and nothing is added."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    init = _os.path.join(_os.path.dirname(here), "kernels", "__init__.py")
    if _os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(init):
        return

    class _ThisCheckoutsKernels:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname != "s2fast.kernels":
                return None
            return _importlib_util.spec_from_file_location(fullname, init,
                                                           submodule_search_locations=[_os.path.dirname(init)])

    _sys.meta_path.insert(0, _ThisCheckoutsKernels)


_kernels_of_this_checkout()

__version__ = "0.1.0"
__all__ = ["S2Config", "SGGConfig", "wrap", "unwrap", "trace", "trace_denoisers", "trace_steps", "config_of", "graph_stats",
           "register_adapter", "S2Guidance", "SGGGuidance", "__version__"]


def __getattr__(name):
    if name in ("wrap", "unwrap", "trace", "trace_denoisers", "trace_steps", "graph_stats", "config_of"):
        from . import api

        return getattr(api, name)
    if name in ("S2Guidance", "SGGGuidance"):
        from . import guiders

        return getattr(guiders, name)
    if name == "register_adapter":
        from .adapters import register_adapter

        return register_adapter
    raise AttributeError(f"module 's2fast' has no attribute {name!r}")
