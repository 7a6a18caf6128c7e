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
    """The S2Config the options ask for (ω, the drop ratio, the mask seed, and generate's cache and correction
    reuse; everything else at its default)."""
    from s2fast import S2Config

    return S2Config(omega=args.omega, drop_ratio=args.drop_ratio, seed=args.seed, branch_parallel=_branch(args),
                    cache=block_cache(args), correction_every=getattr(args, "correction_every", 1))


def block_cache(args):
    """generate --cache THRESHOLD as a BlockCache (None without it; the bench command has no such option)."""
    threshold = getattr(args, "cache", None)
    if threshold is None:
        return None
    from s2fast import BlockCache

    return BlockCache(threshold=threshold)


def _sgg(pipe, args) -> None:
    import s2fast

    s2fast.wrap(pipe, sgg_config(args, num_blocks(pipe)))


# SGG's default skip set, blocks 7, 8 and 9, is SD3-medium's (24 blocks): for other depths the command takes the
# same position and share of the depth (default_skip_blocks).
SGG_DEFAULT_BLOCKS, SGG_DEFAULT_DEPTH = (7, 8, 9), 24


def default_skip_blocks(depth: int) -> tuple:
    """SD3-medium's skip set scaled to a model of ``depth`` blocks: it starts at 7/24 of the depth and covers 3/24
    of it (at least one block, never block 0): 24 blocks -> 7,8,9; the 6-block digits DiT -> 2; 38 blocks -> 11..15."""
    first, count = SGG_DEFAULT_BLOCKS[0], len(SGG_DEFAULT_BLOCKS)
    size = max(1, round(count * depth / SGG_DEFAULT_DEPTH))
    start = min(max(1, round(first * depth / SGG_DEFAULT_DEPTH)), depth - size)
    return tuple(range(start, start + size))


def num_blocks(pipe) -> int:
    from s2fast.adapters import adapter_for

    return len(adapter_for(pipe).blocks(pipe.transformer))


def skip_blocks(args, depth: int) -> tuple:
    """--skip-blocks, or the default scaled to ``depth``."""
    return tuple(args.skip_blocks) if args.skip_blocks is not None else default_skip_blocks(depth)


def sgg_config(args, depth: int):
    """The SGGConfig the options ask for on a model of ``depth`` blocks (the skip blocks and scale; the windows at
    their defaults: CFG on the first half of the steps, skip-layer guidance on the second)."""
    from s2fast import SGGConfig

    return SGGConfig(skip_blocks=skip_blocks(args, depth), skip_scale=args.skip_scale, branch_parallel=_branch(args),
                     cache=block_cache(args))


def settings_of_method(args, pipe) -> Dict:
    """The settings of the method that belong in a run's record: SGG's skip blocks and scale only under SGG."""
    if args.method != "sgg":
        return {}
    return {"skip_blocks": list(skip_blocks(args, num_blocks(pipe))), "skip_scale": args.skip_scale}


def method_label(method: str, args) -> str:
    """The label over a method's picture in a side-by-side (ASCII: PIL's default font)."""
    if method == "s2":
        return f"S2 (w={args.omega:g})"
    if method == "sgg":
        return f"SGG (scale {args.skip_scale:g})"
    return METHODS[method].label


def _branch(args) -> bool:
    """``generate --parallel branch``: the processes share every step (the bench command has no such option)."""
    return getattr(args, "parallel", "data") == "branch"


METHODS: Dict[str, Method] = {
    "cfg": Method("cfg", "CFG", "classifier-free guidance, the stock pipeline", _stock),
    "s2": Method("s2", "S2", "S²-Guidance through s2fast.wrap (ω = --omega)", _s2),
    "sgg": Method("sgg", "SGG", "segmented guidance: CFG on the first half of the steps, skip-layer guidance "
                  "(--skip-blocks, --skip-scale) on the second", _sgg),
}
