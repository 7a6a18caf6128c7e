"""The sampling methods the command offers, by name. Importing this module imports no torch: the parser reads the
names, and each method's ``attach`` imports what it needs when it runs.

A method is one more entry here: its name becomes a ``--method`` choice, and ``generate`` (with ``--compare``)
and the run record pick it up from this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict


@dataclass(frozen=True)
class Method:
    name: str           # the --method value and the file suffix under --compare
    label: str          # for tables and the side-by-side image
    description: str    # for --help
    attach: Callable    # attach(pipe, args): set the pipeline up to sample with this method (args: the parsed options)


def _stock(pipe, args) -> None:
    import s2fast

    s2fast.unwrap(pipe)  # stock: the pipeline's own CFG, bit-identical to a never-wrapped pipeline


def _s2(pipe, args) -> None:
    import s2fast

    s2fast.wrap(pipe, s2_config(args))


def s2_config(args):
    """The S2Config the options ask for (ω and the mask seed; everything else at its default)."""
    from s2fast import S2Config

    return S2Config(omega=args.omega, drop_ratio=args.drop_ratio, seed=args.seed, branch_parallel=_branch(args))


def _sgg(pipe, args) -> None:
    import s2fast

    s2fast.wrap(pipe, sgg_config(args))


def sgg_config(args):
    """The SGGConfig the options ask for (the skip blocks and scale; the windows at their defaults: CFG on the
    first half of the steps, skip-layer guidance on the second)."""
    from s2fast import SGGConfig

    return SGGConfig(skip_blocks=args.skip_blocks, skip_scale=args.skip_scale, branch_parallel=_branch(args))


def _branch(args) -> bool:
    """``generate --parallel branch``: the processes share every step (the bench command has no such option)."""
    return getattr(args, "parallel", "data") == "branch"


METHODS: Dict[str, Method] = {
    "cfg": Method("cfg", "CFG", "classifier-free guidance, the stock pipeline", _stock),
    "s2": Method("s2", "S2", "S²-Guidance through s2fast.wrap (ω = --omega)", _s2),
    "sgg": Method("sgg", "SGG", "segmented guidance: CFG on the first half of the steps, skip-layer guidance "
                  "(--skip-blocks, --skip-scale) on the second", _sgg),
}
