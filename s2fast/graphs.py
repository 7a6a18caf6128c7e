"""Block graphs: one captured graph per (block, lane, input signature), replayed for every mask pattern.

A mask only decides *which* blocks run on *which* lane (engine.py): every block call is then one of a small, fixed
set — block j on the [uncond, cond] lane at 2B rows, block j on a sub-network lane at B rows (and, for naive S², on
its n-th sub-network lane). Capturing each of those once serves every mask without recapture: at most
``num_blocks × (1 + num_masks)`` graphs per shape, whatever masks are drawn (CUDA graphs of the whole model would
need one per distinct skip list: torch.compile of the whole model made one graph per skip pattern).

Each graph owns static input buffers; a call copies its tensors in, replays, and returns the graph's static
outputs. The lane is part of the key, so two lanes of one step never replay the same graph and overwrite each
other's outputs before the next block has read them (a graph's outputs live until that graph's next replay, one
denoising step later, by which time the engine has moved on).

Timestep, class labels and temb reach the graphs as row constants copied into static buffers, so a new step needs
no new graph; shared tensors (rotary embeddings) are copied in too. Non-tensor arguments are part of the key.

Chaining: an input that is exactly another graph's static output — block j−1's output on the same lane — becomes
the graph's static input as it is (no buffer of its own, no copy). When a later step feeds that graph from
elsewhere (a sub-network lane forked at another block), the input is copied into that shared buffer, which is
safe: the producer's output is then not this step's lane state, and nothing else reads it before the producer's
next replay rewrites it.

The capture mechanism is a backend: ``CudaGraphBackend`` (torch.cuda.CUDAGraph with one memory pool shared by all
graphs of a wrap) on a GPU, and ``EagerBackend`` — the same static-buffer contract, run eagerly — for tests on
the CPU: it re-runs the function on the static inputs and writes into the static outputs, so a consumer that kept
an output past the graph's next replay sees it overwritten exactly as on a GPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

Tensors = List[Optional[torch.Tensor]]


def _signature(tensors: Sequence[Optional[torch.Tensor]]) -> Tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device.type, t.device.index) for t in tensors)


def _static_like(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


def _nbytes(tensors: Sequence[Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class EagerBackend:
    """CPU stand-in with a CUDA graph's buffer semantics (see the module docstring). Used by the tests."""

    name = "eager"

    def capture(self, fn: Callable[[Tensors], Tensors], static_in: Tensors):
        static_out = [None if t is None else t.clone() for t in fn(static_in)]

        def replay():
            for dst, src in zip(static_out, fn(static_in)):
                if dst is not None:
                    dst.copy_(src)

        return replay, static_out

    def forget(self) -> None:
        pass

    def pool_bytes(self) -> int:
        return 0


class CudaGraphBackend:
    """torch.cuda.CUDAGraph capture, all graphs of a wrap in one memory pool (they replay one after another on the
    same stream, so the pool's intermediate buffers can be shared). Warm-up runs on a side stream first, as
    torch.cuda.graphs' docs require (lazy cuBLAS/attention workspace set-up must not happen during capture)."""

    name = "cuda"

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: List[Any] = []

    def capture(self, fn: Callable[[Tensors], Tensors], static_in: Tensors):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = fn(static_in)
        self.graphs.append(graph)
        return graph.replay, static_out

    def forget(self) -> None:
        self.graphs.clear()  # dropped graphs release their share of the pool

    def pool_bytes(self) -> int:
        # reserved memory of the graphs' private pool, from the allocator's snapshot; 0 where this torch's
        # snapshot does not name pools (a report, never a reason to fail a capture)
        try:
            return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                       if tuple(seg.get("segment_pool_id", ())) == tuple(self.pool))
        except Exception:
            return 0


@dataclass
class _Graph:
    replay: Callable[[], None]
    static_in: Tensors
    static_out: Tensors


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_calls: int = 0            # calls that ran without a graph (a key that cannot be graphed)
    static_bytes: int = 0           # static input and output buffers of every graph
    pool_bytes: int = 0             # the backend's pool (intermediate activations), where it can tell
    invalidations: int = 0          # times every graph was dropped because the model's parameters changed
    keys: List[Hashable] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {"graphs": len(self.keys), "captures": self.captures, "replays": self.replays,
                "eager_calls": self.eager_calls, "static_bytes": self.static_bytes, "pool_bytes": self.pool_bytes,
                "invalidations": self.invalidations}


class BlockGraphs:
    """The graphs of one wrapped model. ``run(key, fn, tensors, static)`` returns ``fn(tensors)``, through a graph
    captured the first time ``(key, shapes, static)`` is seen and replayed after that.

    ``fn`` must depend only on its tensor arguments and on ``static`` (hashable): that is what makes a replay equal
    to an eager call. ``max_graphs`` bounds the memory: past it, new keys run eagerly (counted in ``eager_calls``)
    rather than capture.
    """

    def __init__(self, backend, max_graphs: int = 1024, chain: bool = True):
        self.backend = backend
        self.max_graphs = max_graphs
        # chain: an input that is exactly another graph's static output (block j−1's output on the same lane, in
        # the common case) is read from that buffer rather than copied into one of its own. That halves the
        # static memory and saves a copy per block; why refilling it from elsewhere is safe: module docstring.
        self.chain = chain
        self._outputs: Dict[int, torch.Tensor] = {}  # data_ptr -> static output, for chaining
        self._graphs: Dict[Hashable, _Graph] = {}
        self.stats = GraphStats()
        # Part of every key: state a replay cannot see. ``context`` is set by the engine (the LoRA scale, applied
        # to the layers in Python); ``variant`` by the controller (the attention backend and the block compile the
        # graphs were captured under), so graphs kept across re-wraps never replay another configuration's kernels.
        self.context: Hashable = ()
        self.variant: Hashable = ()
        self.warmed: set = set()  # the controller's warm-ups already done on these graphs
        self._fingerprint: Optional[Tuple] = None
        self._flat: Optional[Tuple[Dict[str, Any], Any]] = None  # flatten_shared of the last shared dict seen

    def check_model(self, model) -> bool:
        """Drop every graph when the model's parameter tensors changed since the last check (a LoRA loaded or
        fused, weights replaced): a graph reads the storage it was captured with. True when graphs were dropped.
        Called once per pipeline call (cost: one pass over the parameters)."""
        fingerprint = tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in model.parameters())
        stale = self._fingerprint is not None and fingerprint != self._fingerprint and bool(self._graphs)
        self._fingerprint = fingerprint
        if stale:
            self._graphs.clear()
            self._outputs.clear()
            self.warmed.clear()
            self.backend.forget()
            self.stats.keys.clear()
            self.stats.static_bytes = 0
            self.stats.invalidations += 1
        return stale

    def run(self, key: Hashable, fn: Callable[[Tensors], Tensors], tensors: Tensors, static: Hashable = ()) -> Tensors:
        full_key = (key, _signature(tensors), static, self.context, self.variant)
        graph = self._graphs.get(full_key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                self.stats.eager_calls += 1
                return fn(tensors)
            graph = self._capture(full_key, fn, tensors)
        else:
            for dst, src in zip(graph.static_in, tensors):
                if dst is not None and dst.data_ptr() != src.data_ptr():  # a chained input is already in place
                    dst.copy_(src)
        graph.replay()
        self.stats.replays += 1
        return graph.static_out

    def _producer_output(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The static output of some graph that ``t`` is exactly (same storage, shape, strides, dtype), or None."""
        out = self._outputs.get(t.data_ptr()) if self.chain and t is not None else None
        if out is not None and out.shape == t.shape and out.stride() == t.stride() and out.dtype == t.dtype:
            return out
        return None

    def _capture(self, full_key, fn, tensors) -> _Graph:
        static_in, owned = [], []
        for t in tensors:
            buffer = self._producer_output(t)
            if buffer is None and t is not None:
                buffer = _static_like(t)
                buffer.copy_(t)
                owned.append(buffer)
            static_in.append(buffer)
        replay, static_out = self.backend.capture(fn, static_in)
        graph = _Graph(replay, static_in, list(static_out))
        self._graphs[full_key] = graph
        for out in graph.static_out:
            if out is not None:
                self._outputs[out.data_ptr()] = out
        self.stats.captures += 1
        self.stats.keys.append(full_key)
        self.stats.static_bytes += _nbytes(owned) + _nbytes(graph.static_out)
        self.stats.pool_bytes = self.backend.pool_bytes()
        return graph

    def flat_shared(self, shared: Dict[str, Any]):
        """flatten_shared(shared), computed once per shared dict: every block and lane of a step share one."""
        if self._flat is None or self._flat[0] is not shared:
            self._flat = (shared, flatten_shared(shared))
        return self._flat[1]

    def __len__(self) -> int:
        return len(self._graphs)


# The graphs of each model, per backend, kept across re-wraps: wrap(pipe, other_config) — changing ω, say — finds
# the graphs already captured (a graph computes one block on one lane, whatever the config) instead of capturing
# all of them again. s2fast.unwrap(pipe) releases them; the model's collection releases them too.
_KEPT: "weakref.WeakKeyDictionary[Any, Dict[Hashable, BlockGraphs]]" = weakref.WeakKeyDictionary()


def kept_graphs(model, backend=None) -> BlockGraphs:
    """``model``'s graphs on ``backend`` (None: the CUDA backend), created at the first request."""
    per_model = _KEPT.get(model)
    if per_model is None:
        per_model = _KEPT[model] = {}
    key = "cuda" if backend is None else ("backend", id(backend))  # the BlockGraphs holds the backend: ids stay unique
    if key not in per_model:
        per_model[key] = BlockGraphs(CudaGraphBackend() if backend is None else backend)
    return per_model[key]


def release_graphs(model) -> None:
    _KEPT.pop(model, None)


def warmup_subnets(num_blocks: int, config) -> Tuple[Tuple[int, ...], ...]:
    """Sub-networks that fork at the first droppable block p and drop only it: every later mask forks at p or
    after, so its lanes run a subset of the (block, lane) calls these make (fork_mode "separate"). None when no
    step can run a sub-network (ω = 0, as s2fast's CFG baseline, or explicit masks that are all empty): the
    sub-network lanes would hold graphs that are never replayed."""
    explicit = config.step_masks()
    if config.omega == 0 or (explicit is not None and not any(explicit)):
        return ()
    p = min(b for b in range(num_blocks) if b not in config.protected_blocks)
    return ((p,),) * config.num_masks


def _freeze(value) -> Optional[Hashable]:
    """A hashable stand-in for a non-tensor value, or None when it has none (then the call runs eagerly)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("v", value)
    if isinstance(value, (tuple, list)):
        items = [_freeze(v) for v in value]
        return None if any(i is None for i in items) else (type(value).__name__, tuple(items))
    if isinstance(value, dict):
        items = [(k, _freeze(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
        return None if any(i is None for _, i in items) else ("dict", tuple(items))
    return None


def flatten_shared(shared: Dict[str, Any]):
    """(tensors, rebuild, static key) for a lane's shared constants: tensors (alone or in a tuple/list, as Flux's
    rotary (cos, sin)) become graph inputs, copied into static buffers like the flow; everything else must be
    hashable and joins the key. None when some value is neither."""
    tensors: List[torch.Tensor] = []
    layout = []
    for name, value in shared.items():
        if isinstance(value, torch.Tensor):
            layout.append((name, "t", len(tensors)))
            tensors.append(value)
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            layout.append((name, type(value), (len(tensors), len(value))))
            tensors.extend(value)
        else:
            frozen = _freeze(value)
            if frozen is None:
                return None
            layout.append((name, "v", frozen))

    def rebuild(ts: Sequence[torch.Tensor]) -> Dict[str, Any]:
        out = {}
        for (name, kind, where), value in zip(layout, shared.values()):
            if kind == "t":
                out[name] = ts[where]
            elif kind == "v":
                out[name] = value
            else:
                start, n = where
                out[name] = kind(ts[start:start + n])
        return out

    static = tuple((name, kind if isinstance(kind, str) else kind.__name__, where if kind == "v" else None)
                   for name, kind, where in layout)
    return tensors, rebuild, static
