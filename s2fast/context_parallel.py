"""diffusers' context parallelism (CP) under the engine: what its hooks do to the rows s2fast runs.

``transformer.enable_parallelism(config=ContextParallelConfig(...))`` registers one diffusers hook per entry of the
model's ``_cp_plan``: ``cp_input---<module>`` shards a module's inputs (or outputs) along the tokens,
``cp_output---<module>`` all-gathers a module's output. In diffusers 0.42 Flux (and its siblings), Flux.2, Wan and
Qwen-Image have a plan; SD3, Z-Image and DiT have none (CP cannot be enabled on them, and s2fast refuses nothing
extra there).

The engine calls the embedders, the blocks and the head as modules, so every hook on a submodule fires as in the
stock forward. Three things differ, and this module handles them:

- The root's own split (``cp_input---``, the plan's ``""`` entry: Flux and Flux.2 shard hidden states, text and
  position ids there; Wan its per-token timestep) runs on the pipeline's call only, never on the rows the engine
  builds for the other branches from the pipeline's locals. s2fast takes the call's arguments as the pipeline
  passed them (s2fast/binding.py) and shards every branch's rows itself, with the root hook's own sharder
  (:func:`shard_inputs`); a root gather, where a plan has one, is applied to each prediction.
- A block that carries a split or a gather changes how many tokens flow out of it (Wan splits the hidden states at
  ``blocks.0``, Qwen-Image the hidden and text states at ``transformer_blocks.0``): a sub-network that skipped it
  would pass unsharded tokens on. Such blocks are protected from dropping (:func:`with_protected`), and an explicit
  mask or skip set that drops one is refused (:func:`refusals`). A split on every block of the per-call constants
  (Qwen-Image's text mask at ``transformer_blocks.*``) acts on that block's own call only and protects nothing.
- Ranks meet in collectives inside every block, so they must run the same masks and choices: the controller
  broadcasts them over the CP mesh (:attr:`ContextParallel.group`, s2fast/distributed.py).

Block graphs are off under CP: ``cuda_graphs="auto"`` runs eagerly, ``True`` is refused (not measured with the
collectives inside a captured block).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

SPLIT_HOOK = "cp_input---"    # + the module's name in the plan ("" for the root)
GATHER_HOOK = "cp_output---"
# Block inputs that carry the flow (the state one block hands the next): a split of one at a block changes the
# tokens every later block sees. Other inputs (masks, modulation) are passed to every block by the caller.
FLOW_INPUTS = ("hidden_states", "encoder_hidden_states")

GRAPHS_REFUSAL = ("S2Config.cuda_graphs=True is not offered under context parallelism (its all-to-all collectives "
                  "inside a captured block are not measured); use cuda_graphs='auto', which runs such a model without "
                  "block graphs")


@dataclass(frozen=True)
class ContextParallel:
    """The context parallelism on one denoiser: diffusers' config, the root's own hooks, and the blocks whose hooks
    change the tokens that flow out of them (indices into the adapter's block list)."""

    config: Any
    root_split: Any = None
    root_gather: Any = None
    fixed_blocks: Tuple[int, ...] = ()

    @property
    def group(self):
        """The process group of the ranks that share one sample's tokens (the flattened ring × Ulysses mesh)."""
        return self.config._flattened_mesh.get_group()


def _hooks(module) -> Dict[str, Any]:
    return getattr(module.__dict__.get("_diffusers_hook"), "hooks", {})


def _cp_hooks(module):
    return [(n, h) for n, h in _hooks(module).items() if n.startswith(SPLIT_HOOK) or n.startswith(GATHER_HOOK)]


def find(adapter, model) -> Optional[ContextParallel]:
    """The context parallelism enabled on ``model``, or None (a walk of its modules: once per pipeline call)."""
    config = None
    for module in model.modules():
        for _, hook in _cp_hooks(module):
            config = hook.parallel_config
            break
        if config is not None:
            break
    if config is None:
        return None
    root = _hooks(model)
    fixed = tuple(j for j, block in enumerate(adapter.blocks(model)) if _changes_flow(block))
    return ContextParallel(config, root.get(SPLIT_HOOK), root.get(GATHER_HOOK), fixed)


def _changes_flow(block) -> bool:
    """Whether a CP hook on ``block`` or inside it changes the number of tokens of what flows through it."""
    for module in block.modules():
        for name, hook in _cp_hooks(module):
            if name.startswith(GATHER_HOOK):
                return True
            for key, entry in hook.metadata.items():
                entries = entry if isinstance(entry, (list, tuple)) else [entry]
                if key in FLOW_INPUTS or any(getattr(e, "split_output", False) for e in entries):
                    return True
    return False


def shard_inputs(cp: Optional[ContextParallel], inputs: Dict[str, Any]) -> Dict[str, Any]:
    """One branch's model inputs, by name, split as the root's ``cp_input---`` hook splits the pipeline's call:
    the same entries of the plan, through the hook's own sharder (``chunk(world)[rank]`` along the plan's dim, or
    the "anything" partition where the config asks for it). Inputs the plan does not name are returned as they are."""
    if cp is None or cp.root_split is None:
        return inputs
    out = dict(inputs)
    for name, entry in cp.root_split.metadata.items():
        value = out.get(name)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            out[name] = cp.root_split._prepare_cp_input(value, entry)
        elif isinstance(value, (list, tuple)):
            out[name] = type(value)(cp.root_split._prepare_cp_input(v, e) if torch.is_tensor(v) else v
                                    for v, e in zip(value, entry))
    return out


def gather_prediction(cp: Optional[ContextParallel], model, prediction: torch.Tensor) -> torch.Tensor:
    """A prediction gathered as the root's ``cp_output---`` hook gathers the forward's output (no plan of diffusers
    0.42 has one: they gather at ``proj_out``, which the head calls as a module)."""
    if cp is None or cp.root_gather is None:
        return prediction
    return cp.root_gather.post_forward(model, prediction)


def refusals(cp: ContextParallel, config, num_blocks: int) -> List[str]:
    """What ``config`` asks that S² cannot do under ``cp``, one line each (empty: nothing)."""
    found = []
    if getattr(config, "cuda_graphs", None) is True:
        found.append(GRAPHS_REFUSAL)
    if getattr(config, "cache", None) is not None:
        found.append("a BlockCache decides each step from the cond rows, which context parallelism splits over the "
                     "ranks: each would decide from its own shard (use cache=None)")
    if cp.root_split is not None and any(
            getattr(e, "split_output", False) for entry in cp.root_split.metadata.values()
            for e in (entry if isinstance(entry, (list, tuple)) else [entry])):
        found.append("the context-parallel plan splits the outputs of the model's own forward, which s2fast does not "
                     "reproduce")
    fixed = set(cp.fixed_blocks)
    if fixed:
        for where, mask in _fixed_masks(config, num_blocks):
            hit = sorted(fixed & set(mask))
            if hit:
                found.append(f"{where} drops block {hit[0]}, which carries a context-parallel split or gather (the "
                             "tokens after it are sharded; a sub-network that skipped it would pass unsharded ones "
                             f"on): under context parallelism blocks {sorted(fixed)} cannot be dropped")
                break
    return found


def _fixed_masks(config, num_blocks: int):
    """(where, mask) for every mask the config names itself: explicit S² masks, a method's fixed sub-networks."""
    own = getattr(config, "warmup_subnets", None)
    if own is not None:  # a method with its own fixed sub-networks (SGGConfig's skip_blocks)
        for mask in own(num_blocks):
            yield f"{type(config).__name__}'s skip set {tuple(mask)}", mask
        return
    explicit = config.step_masks() if hasattr(config, "step_masks") else None
    for i, step in enumerate(explicit or ()):
        for mask in step:
            yield f"S2Config.masks[{i}]", mask


def with_protected(config, fixed_blocks: Tuple[int, ...]):
    """``config`` with ``fixed_blocks`` added to its protected blocks (a config without protected blocks, or that
    protects them already, as it is)."""
    protected = getattr(config, "protected_blocks", None)
    if protected is None or set(fixed_blocks) <= set(protected):
        return config
    return dataclasses.replace(config, protected_blocks=tuple(sorted(set(protected) | set(fixed_blocks))))
