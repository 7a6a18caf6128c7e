"""A plain BlockCache loop for the tests, written apart from the engine: a predictor with its own residual store.

Plugged into the controller in place of the engine (``s2fast.wrap(pipe, config, _predictor=CachedReference(...))``),
so it is handed the same rows and masks. Every branch and every sub-network runs alone at batch B, from its own
embedding through every block (a sub-network skips its masked blocks: nothing is shared with the cond rows), and
the cache follows the rule as s2fast/step_cache.py states it, counted here from its own step counter:

- the first and last step of a call, the first warmup_steps, and a step whose denoiser differs from the last
  step's run fully; so does a step for whose rows the store of that denoiser lacks a residual;
- otherwise, with r = h_n − h_0 of the cond rows and r_ref that of the last full step of the same denoiser, the step
  is cached when mean|r − r_ref| / mean|r_ref| < threshold: each row group gets h_n + its residual from the last
  full step ("recompute": the sub-networks run their remaining blocks instead);
- a full step stores, per role (uncond, cond, sub-network m), the output minus h_n, and r_ref = r.
"""

from typing import Dict, List


class CachedReference:
    def __init__(self, cache, steps: int):
        self.cache, self.steps = cache, steps
        self.calls = 0
        self.log: List[str] = []          # "full" / "cached" per step, what this loop ran
        self.stores: Dict[int, dict] = {}
        self.last_model = None

    def __call__(self, adapter, model, rows, subnets, options=None):
        i = self.calls % self.steps
        self.calls += 1
        if i == 0:
            self.stores, self.last_model, self.log = {}, None, []
        c, n = self.cache, self.cache.probe_blocks
        store = self.stores.setdefault(id(model), {})
        forced = i == 0 or i == self.steps - 1 or i < c.warmup_steps or model is not self.last_model
        self.last_model = model
        blocks = adapter.blocks(model)

        jobs = []  # (role, inputs, dropped blocks)
        for j in range(rows.count):
            jobs.append(("cond" if j == rows.cond_branch else "uncond", rows.branch(j), ()))
        for m, mask in enumerate(subnets):
            jobs.append((f"subnet{m}", rows.branch(rows.cond_branch), tuple(mask)))
        states, probe = {}, None
        for name, inputs, drops in jobs:
            state = adapter.embed(model, inputs)
            start = state.flow[0]
            for j in range(n):
                assert j not in drops
                state.flow = adapter.run_block(blocks[j], state.flow, state.row_consts, state.shared)
            states[name] = state
            if name == "cond":
                probe = state.flow[0] - start
        recompute = c.subnet == "recompute"
        needed = [name for name, _, drops in jobs if not (drops and recompute)]
        cached = False
        if not forced and "ref" in store and all(name in store for name in needed):
            ref = store["ref"].float()
            change = ((probe.float() - ref).abs().mean() / ref.abs().mean()).item()
            cached = change < c.threshold
        self.log.append("cached" if cached else "full")
        if options is not None and options.cache is not None:
            options.cache.cached = cached  # so that s2fast.trace_steps reports this loop's steps
        outputs = {}
        new_store = {"ref": probe}
        for name, _, drops in jobs:
            state = states[name]
            at_probe = list(state.flow)
            if cached and name in needed:
                state.flow = [None if t is None or r is None else t + r for t, r in zip(at_probe, store[name])]
            else:
                for j in range(n, len(blocks)):
                    if j not in drops:
                        state.flow = adapter.run_block(blocks[j], state.flow, state.row_consts, state.shared)
                new_store[name] = [None if a is None or b is None else a - b for a, b in zip(state.flow, at_probe)]
            outputs[name] = adapter.head(model, state)
        if not cached:
            self.stores[id(model)] = new_store
        return [outputs[name] for name, _, _ in jobs]
