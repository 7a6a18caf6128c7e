"""s2fast: S²-Guidance sampling for diffusers pipelines at the cost of the arithmetic it needs.

    cfg = s2fast.S2Config(omega=0.25)
    s2fast.wrap(pipe, cfg)     # the pipeline's own call now samples with S²-Guidance
    s2fast.trace(pipe)         # the masks of the last call
    s2fast.unwrap(pipe)        # restores the pipeline exactly
    s2fast.wrap(pipe, s2fast.SGGConfig())   # segmented guidance: CFG, then skip-layer guidance
    s2fast.register_adapter(MyPipeline, MyAdapter)   # teach wrap another pipeline class

Importing s2fast is cheap: torch and diffusers are imported when wrap is first used.
"""

from .config import S2Config
from .sgg import SGGConfig

__version__ = "0.1.0"
__all__ = ["S2Config", "SGGConfig", "wrap", "unwrap", "trace", "config_of", "graph_stats", "register_adapter", "__version__"]


def __getattr__(name):
    if name in ("wrap", "unwrap", "trace", "graph_stats", "config_of"):
        from . import api

        return getattr(api, name)
    if name == "register_adapter":
        from .adapters import register_adapter

        return register_adapter
    raise AttributeError(f"module 's2fast' has no attribute {name!r}")
