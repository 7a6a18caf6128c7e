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
no new graph; shared tensors (rotary embeddings) are copied once per step into one buffer per shape that every
graph reads. Non-tensor arguments are part of the key, and so are the LoRA scale and the autocast state.

Chaining: an input that is exactly another graph's static output — block j−1's output on the same lane — becomes
the graph's static input as it is (no buffer of its own, no copy). When a later step feeds that graph from
elsewhere (a sub-network lane forked at another block), the input is copied into that shared buffer, which is
safe: the producer's output is then not this step's lane state, and nothing else reads it before the producer's
next replay rewrites it.

Ping-pong outputs (``ping_pong``, on by default): a graph's outputs would otherwise be static buffers of its own,
alive as long as the graph, so static memory grew with depth (L blocks × lanes × an output each: ~93 GB at Wan
14B 720p). A block's output is dead once the next block has read it, so the engine gives each call a slot
``(lane, j mod 2)``, and every graph of a slot writes its outputs into that slot's buffer (one per output position
and shape): block j writes where block j − 2's output was. The graph's own outputs become intermediates of its pool,
freed after capture. Static memory is then 2 × (one block's outputs) per lane and row count, whatever the depth.
What keeps it safe: a block's input is the other parity's buffer (or a fresh tensor); a graph whose chained input
is its own destination (block j − 1 dropped on the lane, so block j + 1 would read and write one buffer) gets an
input buffer of its own instead; a sub-network lane forked in "separate" mode starts from a copy of the cond
lane's state, not a view of the cond lane's buffer, which that lane overwrites two blocks later; a dropped block
passes its input on, and the next block copies it into its own input buffer before writing the other parity.

Memory pools and replay order. torch lets graphs share a memory pool only if they replay in the order they were
captured: a graph's intermediates reuse memory that earlier captures freed, so a graph captured later may keep its
outputs where an earlier graph's intermediates go, and replaying that earlier graph after it overwrites them.
Within one prediction (one step's block calls) the engine calls graphs in a fixed order — block by block, lane by
lane — so the captures of one prediction, made in that order, are replayed in that order by every later
prediction (a mask only skips some). A prediction that captures (the warm-up, or a later one that meets a new key:
a new LoRA scale, more masks, ...) therefore opens a pool of its own, and graphs of different pools never share
memory, so no order of replays across pools can corrupt one. As a backstop, a replay that would go back in its
pool's capture order within a prediction runs eagerly instead (counted in ``order_fallbacks``). A graph's outputs
are read within the prediction that replays it; the next prediction's replays may overwrite them.

The capture mechanism is a backend: ``CudaGraphBackend`` (torch.cuda.CUDAGraph, a pool per capture set) on a GPU,
and ``EagerBackend`` — the same static-buffer contract, run eagerly — for tests on the CPU: it re-runs the function
on the static inputs and writes into the static outputs, so a consumer that kept an output past the graph's next
replay sees it overwritten exactly as on a GPU. ``RecordingBackend`` also records captures and replays, for the
order check. A capture that fails (a block that synchronises with the host, or holds a CUDA graph of its own) drops
the graphs: the wrap runs its blocks eagerly, logged once and counted in ``capture_failures``.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from .kernels.dispatch import log_once

Tensors = List[Optional[torch.Tensor]]


def _signature(tensors: Sequence[Optional[torch.Tensor]]) -> Tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device.type, t.device.index) for t in tensors)


def _static_like(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


def _writing_into(fn: Callable[[Tensors], Tensors], destinations: Tensors) -> Callable[[Tensors], Tensors]:
    """``fn`` whose outputs are copied into ``destinations`` (ping-pong buffers, allocated outside any graph) and
    which returns nothing: the graph's own outputs are then intermediates its pool may reuse."""

    def write(static_in: Tensors) -> Tensors:
        outs = list(fn(static_in))
        for i, (dst, out) in enumerate(zip(destinations, outs)):
            if dst is None or out is None:
                continue
            # an output still to be copied that aliases this destination (a block returning its input) is
            # saved first
            for k in range(i + 1, len(outs)):
                if outs[k] is not None and outs[k].data_ptr() == dst.data_ptr():
                    outs[k] = outs[k].clone()
            if out.data_ptr() != dst.data_ptr():
                dst.copy_(out)
        return []

    return write


def _nbytes(tensors: Sequence[Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class CaptureFailed(RuntimeError):
    """A graph could not be captured (the block synchronises with the host, holds a graph of its own, ...)."""


class EagerBackend:
    """CPU stand-in with a CUDA graph's buffer semantics (see the module docstring). Used by the tests."""

    name = "eager"

    def __init__(self):
        self._pools = 0

    def new_pool(self) -> Hashable:
        self._pools += 1
        return ("eager-pool", self._pools)

    def begin_prediction(self) -> None:
        pass

    def capture(self, fn: Callable[[Tensors], Tensors], static_in: Tensors, pool: Hashable):
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


class RecordingBackend(EagerBackend):
    """EagerBackend that records every prediction start, capture and replay as (event, pool, capture index), so a
    test can check the order rule of shared pools (``order_violations``). With ``clobber`` it also does to the
    outputs what a shared pool may do on a GPU: replaying a graph overwrites (with NaN) the outputs of the graphs
    of its pool captured after it, whose memory its intermediates may reuse; replays in capture order rewrite
    them before anyone reads them, replays out of order leave NaN in the result."""

    name = "recording"

    def __init__(self, clobber: bool = True):
        super().__init__()
        self.clobber = clobber
        self.events: List[Tuple[str, Any, int]] = []
        self._captured = 0
        self._outputs: Dict[Hashable, List[Tuple[int, Tensors]]] = {}  # pool -> (capture index, static outputs)

    def begin_prediction(self) -> None:
        self.events.append(("begin", None, -1))

    def capture(self, fn, static_in, pool):
        index, self._captured = self._captured, self._captured + 1
        self.events.append(("capture", pool, index))
        replay, static_out = super().capture(fn, static_in, pool)
        self._outputs.setdefault(pool, []).append((index, static_out))

        def recorded_replay():
            self.events.append(("replay", pool, index))
            if self.clobber:
                for later, outputs in self._outputs[pool]:
                    if later > index:
                        for t in outputs:
                            if t is not None and t.is_floating_point():
                                t.fill_(float("nan"))
            replay()

        return recorded_replay, static_out

    def forget(self) -> None:
        self._outputs.clear()

    def order_violations(self) -> List[str]:
        """Replays that break torch's rule for graphs sharing a pool: within one prediction, the graphs of a pool
        must replay in the order they were captured (see the module docstring)."""
        found, last = [], {}
        for event, pool, index in self.events:
            if event == "begin":
                last = {}
            elif event == "replay":
                if index <= last.get(pool, -1):
                    found.append(f"graph {index} of pool {pool} replayed after graph {last[pool]}")
                last[pool] = index
        return found


class CudaGraphBackend:
    """torch.cuda.CUDAGraph capture. The graphs of one capture set (one prediction's captures) share a memory pool;
    each set has a pool of its own (module docstring: why). Warm-up runs on a side stream first, as
    torch.cuda.graphs' docs require (lazy cuBLAS/attention workspace set-up must not happen during capture)."""

    name = "cuda"

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.pools: List[Any] = []
        self.graphs: List[Any] = []

    def new_pool(self):
        # always a fresh handle: a pool id released by forget() is never handed to a new capture
        pool = torch.cuda.graph_pool_handle()
        self.pools.append(pool)
        return pool

    def begin_prediction(self) -> None:
        pass

    def capture(self, fn: Callable[[Tensors], Tensors], static_in: Tensors, pool):
        stream = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(static_in)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                static_out = fn(static_in)
        except Exception as e:
            # torch.cuda.graph leaves its capture stream current when ending the capture raises: restore ours
            torch.cuda.set_stream(stream)
            raise CaptureFailed(f"{type(e).__name__}: {e}") from e
        self.graphs.append(graph)
        return graph.replay, static_out

    def forget(self) -> None:
        self.graphs.clear()  # dropped graphs release their share of their pools
        self.pools.clear()

    def pool_bytes(self) -> int:
        # reserved memory of the graphs' private pools, from the allocator's snapshot; 0 where this torch's
        # snapshot does not name pools (a report, never a reason to fail a capture)
        try:
            pools = {tuple(p) for p in self.pools}
            return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                       if tuple(seg.get("segment_pool_id", ())) in pools)
        except Exception:
            return 0


@dataclass
class _Graph:
    replay: Callable[[], None]
    static_in: Tensors
    static_out: Tensors
    pool: Hashable = None
    index: int = 0              # capture order, over all graphs of the BlockGraphs


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_calls: int = 0            # calls that ran without a graph (a key that cannot be graphed, or a fallback)
    static_bytes: int = 0           # static input and output buffers of every graph, and the shared buffers
    pool_bytes: int = 0             # the backend's pools (intermediate activations), where it can tell
    invalidations: int = 0          # times every graph was dropped because the model's parameters changed
    capture_failures: int = 0       # captures that raised: the graphs were dropped and the wrap runs eagerly
    order_fallbacks: int = 0        # replays refused because they would break a pool's capture order (ran eagerly)
    pools: int = 0                  # capture sets opened (one memory pool each)
    keys: List[Hashable] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {"graphs": len(self.keys), "captures": self.captures, "replays": self.replays,
                "eager_calls": self.eager_calls, "static_bytes": self.static_bytes, "pool_bytes": self.pool_bytes,
                "invalidations": self.invalidations, "capture_failures": self.capture_failures,
                "order_fallbacks": self.order_fallbacks, "pools": self.pools}


class BlockGraphs:
    """The graphs of one wrapped model. ``run(key, fn, tensors, static)`` returns ``fn(tensors)``, through a graph
    captured the first time ``(key, shapes, static)`` is seen and replayed after that.

    ``fn`` must depend only on its tensor arguments and on ``static`` (hashable): that is what makes a replay equal
    to an eager call. ``max_graphs`` bounds the memory: past it, new keys run eagerly (counted in ``eager_calls``)
    rather than capture. The caller marks each prediction (one denoising step's calls) with ``begin_prediction``:
    the captures of one prediction share a pool, and replays are checked against the pool's capture order.
    """

    def __init__(self, backend, max_graphs: int = 1024, chain: bool = True, ping_pong: bool = True):
        self.backend = backend
        # ping_pong: calls that name a slot write their outputs into that slot's buffers (module docstring)
        self.ping_pong = ping_pong
        self._slots: Dict[Hashable, torch.Tensor] = {}  # (slot, output position, shape, dtype, device) -> buffer
        self.max_graphs = max_graphs
        # chain: an input that is exactly another graph's static output (block j−1's output on the same lane, in
        # the common case) is read from that buffer rather than copied into one of its own. That halves the
        # static memory and saves a copy per block; why refilling it from elsewhere is safe: module docstring.
        self.chain = chain
        self._outputs: Dict[int, torch.Tensor] = {}  # data_ptr -> static output, for chaining
        self._graphs: Dict[Hashable, _Graph] = {}
        self.stats = GraphStats()
        # Part of every key: state a replay cannot see. ``context`` is set per prediction by the engine (the LoRA
        # scale, applied to the layers in Python, and the autocast state); ``variant`` by the controller (the
        # attention backend and the block compile the graphs were captured under), so graphs kept across re-wraps
        # never replay another configuration's kernels.
        self.context: Hashable = ()
        self.variant: Hashable = ()
        self.warmed: set = set()  # the controller's warm-ups already done on these graphs
        # Why the last capture failed: while set, every call runs eagerly (the controller clears it at a new wrap).
        self.failure: Optional[str] = None
        self._fingerprint: Optional[Tuple] = None
        self._flat: Optional[Tuple[Dict[str, Any], Any]] = None  # flatten_shared of the last shared dict seen
        # One static buffer per shared tensor (rotary embeddings) and shape, read by every graph in place
        self._shared: Dict[Hashable, torch.Tensor] = {}
        self._shared_ptrs: Dict[int, torch.Tensor] = {}
        self._captured = 0
        self._capture_pool: Optional[Hashable] = None     # the pool of this prediction's captures, once opened
        self._last_replayed: Dict[Hashable, int] = {}    # pool -> capture index of its last replay this prediction

    def begin_prediction(self, context: Hashable = ()) -> None:
        """Start a prediction: its captures go to a new pool (opened at the first one), and the order check of
        every pool starts afresh."""
        self.context = context
        self._capture_pool = None
        self._last_replayed = {}
        self.backend.begin_prediction()

    def check_model(self, model) -> bool:
        """Drop every graph when the model's parameter tensors changed since the last check (a LoRA loaded or
        fused, weights replaced): a graph reads the storage it was captured with. True when graphs were dropped.
        Called once per pipeline call (cost: one pass over the parameters)."""
        fingerprint = tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in model.parameters())
        stale = self._fingerprint is not None and fingerprint != self._fingerprint and bool(self._graphs)
        self._fingerprint = fingerprint
        if stale:
            self.drop()
            self.stats.invalidations += 1
        return stale

    def drop(self) -> None:
        """Forget every graph and pool (the shared buffers stay: they hold no model state)."""
        self._graphs.clear()
        self._outputs.clear()
        self._slots.clear()
        self.warmed.clear()
        self.backend.forget()
        self.stats.keys.clear()
        self.stats.static_bytes = _nbytes(self._shared.values())
        self.stats.pool_bytes = 0
        self._capture_pool = None
        self._last_replayed = {}

    def run(self, key: Hashable, fn: Callable[[Tensors], Tensors], tensors: Tensors, static: Hashable = (),
            slot: Optional[Hashable] = None) -> Tensors:
        """``slot`` (with ``ping_pong``): (lane, parity), the ping-pong buffer set this call's outputs go to; the
        caller guarantees that nothing reads that slot's previous outputs after this call (module docstring). The
        graphs of one lane also share their input buffers (per position and shape) where an input is not another
        graph's output: row constants (temb, Wan's text stream), a lane's first block, rows rebuilt after a block
        some rows drop. Each replay refills them before it runs, and no lane state ever lives in one."""
        if not self.ping_pong:
            slot = None
        if self.failure is not None:
            self.stats.eager_calls += 1
            return fn(tensors)
        full_key = (key, _signature(tensors), static, self.context, self.variant)
        graph = self._graphs.get(full_key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                self.stats.eager_calls += 1
                return fn(tensors)
            try:
                graph = self._capture(full_key, fn, tensors, slot)
            except CaptureFailed as e:
                self._fail(str(e))
                self.stats.eager_calls += 1
                return fn(tensors)
        else:
            if self._out_of_order(graph):
                self.stats.order_fallbacks += 1
                self.stats.eager_calls += 1
                log_once("s2fast: a block graph was called out of its pool's capture order; ran it eagerly")
                return fn(tensors)
            for dst, src in zip(graph.static_in, tensors):
                if dst is not None and dst.data_ptr() != src.data_ptr():  # a chained input is already in place
                    dst.copy_(src)
        graph.replay()
        self._last_replayed[graph.pool] = graph.index
        self.stats.replays += 1
        return graph.static_out

    def _out_of_order(self, graph: _Graph) -> bool:
        """A later-captured graph of this graph's pool already ran in this prediction: its outputs may sit in the
        memory this graph's intermediates use. The engine's (block, lane) order never gets here."""
        return graph.index < self._last_replayed.get(graph.pool, -1)

    def _fail(self, reason: str) -> None:
        self.failure = reason
        self.stats.capture_failures += 1
        self.drop()
        log_once(f"s2fast: capturing a block graph failed ({reason}); this wrap runs its blocks eagerly, without "
                 "graphs (cuda_graphs=False avoids the attempt)", logging.WARNING)

    def _producer_output(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The static buffer that ``t`` is exactly (same storage, shape, strides, dtype): another graph's static
        output, or a shared buffer; None otherwise."""
        if t is None:
            return None
        out = self._shared_ptrs.get(t.data_ptr())
        if out is None and self.chain:
            out = self._outputs.get(t.data_ptr())
        if out is not None and out.shape == t.shape and out.stride() == t.stride() and out.dtype == t.dtype:
            return out
        return None

    def _capture(self, full_key, fn, tensors, slot: Optional[Hashable] = None) -> _Graph:
        if self._capture_pool is None:
            self._capture_pool = self.backend.new_pool()
            self.stats.pools += 1
        # Outside inference mode: the buffers outlive this call, and a later call outside inference_mode must be
        # able to copy into them (inference tensors refuse in-place updates there). No autograd either way.
        with torch.inference_mode(False), torch.no_grad():
            destinations = self._slot_buffers(slot, fn, tensors) if slot is not None else None
            static_in, owned = [], []
            for position, t in enumerate(tensors):
                buffer = self._producer_output(t)
                if buffer is not None and destinations is not None and any(
                        d is not None and d.data_ptr() == buffer.data_ptr() for d in destinations):
                    buffer = None  # its own destination (the block before was dropped): reading it while writing
                if buffer is None and t is not None and destinations is not None:
                    key = ("lane input", slot[0], position, tuple(t.shape), t.dtype, t.device)
                    buffer = self._slots.get(key)
                    if buffer is None:
                        buffer = self._slots[key] = _static_like(t)
                        owned.append(buffer)
                    buffer.copy_(t)
                elif buffer is None and t is not None:
                    buffer = _static_like(t)
                    buffer.copy_(t)
                    owned.append(buffer)
                static_in.append(buffer)
            if destinations is None:
                replay, static_out = self.backend.capture(fn, static_in, self._capture_pool)
            else:
                replay, _ = self.backend.capture(_writing_into(fn, destinations), static_in, self._capture_pool)
                static_out = destinations
        graph = _Graph(replay, static_in, list(static_out), self._capture_pool, self._captured)
        self._captured += 1
        self._graphs[full_key] = graph
        for out in graph.static_out:
            if out is not None:
                self._outputs[out.data_ptr()] = out
        self.stats.captures += 1
        self.stats.keys.append(full_key)
        self.stats.static_bytes += _nbytes(owned) + (_nbytes(graph.static_out) if destinations is None else 0)
        self.stats.pool_bytes = self.backend.pool_bytes()
        return graph

    def _slot_buffers(self, slot: Hashable, fn, tensors) -> Tensors:
        """The ping-pong buffers of ``slot`` for ``fn``'s outputs (one per position and shape), allocated at the
        first graph that needs them; their shapes come from one eager call (the capture runs ``fn`` anyway)."""
        buffers = []
        for i, out in enumerate(fn(tensors)):
            if out is None:
                buffers.append(None)
                continue
            key = (slot, i, tuple(out.shape), out.dtype, out.device)
            buffer = self._slots.get(key)
            if buffer is None:
                buffer = self._slots[key] = _static_like(out)
                self.stats.static_bytes += _nbytes([buffer])
            buffers.append(buffer)
        return buffers

    def flat_shared(self, shared: Dict[str, Any]):
        """flatten_shared(shared), computed once per shared dict: every block and lane of a step share one."""
        if self._flat is None or self._flat[0] is not shared:
            self._flat = (shared, self._into_shared_buffers(flatten_shared(shared)))
        return self._flat[1]

    def _into_shared_buffers(self, flat):
        """Copy the shared tensors (the same for every block and lane of a step) once into one static buffer per
        (position, shape): every graph reads that buffer in place, so a replay copies none of them. Flux's rotary
        (cos, sin) at 1024² is ~4.7 MB: a buffer per graph would copy it at every block call."""
        if flat is None:
            return None
        tensors, rebuild, static = flat
        buffers = []
        for i, t in enumerate(tensors):
            key = (i, tuple(t.shape), t.dtype, t.device)
            buffer = self._shared.get(key)
            if buffer is None:
                with torch.inference_mode(False), torch.no_grad():  # outlives this call: see _capture
                    buffer = _static_like(t)
                self._shared[key] = buffer
                self._shared_ptrs[buffer.data_ptr()] = buffer
                self.stats.static_bytes += _nbytes([buffer])
            if buffer.data_ptr() != t.data_ptr():
                buffer.copy_(t)
            buffers.append(buffer)
        return buffers, rebuild, static

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
