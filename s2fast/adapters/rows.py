"""The model inputs of one transformer call, grouped by branch (uncond, cond): what the engine batches."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch


class BranchRows:
    """The model inputs of ``count`` branches (uncond, cond, ...) of B rows each.

    ``stacked`` holds all branches concatenated along the batch dimension (what one batched call takes), and
    ``branch(j)`` one branch's inputs; with two branches, the one that is not ``cond_branch`` is the uncond one.
    Inputs named in ``batched_keys`` carry the batch dimension; the others
    (position ids, attention kwargs) are shared and must be equal across branches to be stacked.
    """

    def __init__(self, batched_keys: Sequence[str], count: int, stacked: Dict[str, Any] = None,
                 branches: Sequence[Dict[str, Any]] = None, cond_branch: Optional[int] = None):
        if (stacked is None) == (branches is None):
            raise ValueError("BranchRows needs exactly one of stacked and branches")
        self.batched_keys = tuple(batched_keys)
        self.count = count
        # Which branch is the conditional one (the sub-networks fork from it): the last by default ([uncond, cond]
        # or [cond]); DiT's pipeline stacks [cond, uncond].
        self.cond_branch = count - 1 if cond_branch is None else cond_branch
        self._stacked = stacked
        self._branches = [_broadcast_rows(b, self.batched_keys) for b in branches] if branches is not None else None
        self._unstackable = False
        if self._branches is not None and len(self._branches) != count:
            raise ValueError(f"BranchRows: {len(self._branches)} branches given for count={count}")

    @property
    def rows_per_branch(self) -> int:
        if self._branches is not None:
            return self._branches[0]["hidden_states"].shape[0]
        return self._stacked["hidden_states"].shape[0] // self.count

    def branch(self, j: int) -> Dict[str, Any]:
        if self._branches is not None:
            return self._branches[j]
        b = self.rows_per_branch
        return {k: (_rows_of(v, j * b, b) if k in self.batched_keys and v is not None else v)
                for k, v in self._stacked.items()}

    def only(self, j: int) -> "BranchRows":
        """Branch ``j`` alone (one branch of B rows): the rows of a step that needs no uncond prediction."""
        return BranchRows(self.batched_keys, 1, branches=[self.branch(j)])

    def map_inputs(self, fn) -> "BranchRows":
        """These rows with ``fn(inputs)`` applied to each branch's inputs (or to the stacked ones, where only those
        exist): context parallelism splits each branch's tokens as the model's own forward would."""
        if self._branches is not None:
            return BranchRows(self.batched_keys, self.count, branches=[fn(b) for b in self._branches],
                              cond_branch=self.cond_branch)
        return BranchRows(self.batched_keys, self.count, stacked=fn(self._stacked), cond_branch=self.cond_branch)

    def stacked(self) -> Optional[Dict[str, Any]]:
        """All branches in one batch, or None when their shared inputs differ (they cannot share a call)."""
        if self._stacked is None and not self._unstackable:
            self._stacked = _stack(self._branches, self.batched_keys)
            self._unstackable = self._stacked is None
        return self._stacked


def _rows_of(v, start: int, b: int):
    """Rows start..start+b of a batched input: a tensor's, or a list's items (Z-Image passes per-sample lists)."""
    return v[start:start + b] if isinstance(v, list) else v.narrow(0, start, b)


def _stack(branches: Sequence[Dict[str, Any]], batched_keys: Sequence[str]) -> Optional[Dict[str, Any]]:
    first = branches[0]
    out: Dict[str, Any] = {}
    for k, v in first.items():
        if k in batched_keys and v is not None:
            if any(not isinstance(b[k], torch.Tensor) or b[k].shape[1:] != v.shape[1:] for b in branches[1:]):
                return None  # e.g. prompt and negative embeddings of different lengths: one batch cannot hold both
            out[k] = torch.cat([b[k] for b in branches], dim=0)
        elif all(_same(v, b[k]) for b in branches[1:]):
            out[k] = v
        else:
            return None
    return out


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # e.g. dicts holding tensors: treat as different, run apart
        return False


def _broadcast_rows(branch: Dict[str, Any], batched_keys: Sequence[str]) -> Dict[str, Any]:
    """The branch with every batched input at the hidden states' batch size B. A pipeline may pass batch-1 prompt
    embeddings with B latents (Flux with ``num_images_per_prompt`` and given embeddings): its stock forward
    broadcasts them, and rows stacked or forked by the engine must be B rows each. ``expand`` copies nothing."""
    b = branch["hidden_states"].shape[0]
    out = dict(branch)
    for k in batched_keys:
        v = branch.get(k)
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == 1 and b > 1:
            out[k] = v.expand(b, *v.shape[1:])
    return out
