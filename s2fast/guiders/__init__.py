"""s2fast's methods as diffusers guiders for the modular pipelines: S2Guidance and SGGGuidance
(s2fast/guiders/guidance.py), the families they serve (families.py) and their one-call transformer hook (hook.py)."""

from .families import ModularFamily, register_modular_family, supported_transformers
from .guidance import S2Guidance, SGGGuidance

__all__ = ["S2Guidance", "SGGGuidance", "ModularFamily", "register_modular_family", "supported_transformers"]
