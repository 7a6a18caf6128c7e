"""End to end on a GPU: SD3-medium-shaped and Flux-dev-shaped transformers (random weights, bf16, 1024², 28 steps),
stock diffusers CFG against s2fast (CFG and S², each optimisation switchable: block graphs, fused step, regional
torch.compile with and without graphs) and the naive three-pass S².

Each case is one whole pipeline call (output_type="latent": no VAE, no text encoders, the same for every method),
timed with CUDA events, in interleaved rounds after a warm-up call (which also captures s2fast's block graphs).
Reported per case: median seconds, ratio to stock CFG, peak memory, and for S² the block-row floor of the masks it
drew (the cost model of docs/PERFORMANCE.md). Targets: s2fast S² end to end ≤ stock CFG; peak memory ≤ stock CFG + 10 %.

    .venv/bin/pytest benchmarks/test_gpu_pipelines.py --benchmark-only -k sd3      # skipped without CUDA
"""

import pytest
import torch

import s2fast
from s2fast import S2Config, tiny, tiny_families
from s2fast.adapters.base import BranchRows
from s2fast.adapters.sd3 import SD3Adapter
from s2fast.engine import EngineOptions, block_rows, predict
from s2fast.graphs import BlockGraphs, CudaGraphBackend
from s2fast.reference import three_pass, wrap_three_pass

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="times whole pipelines on a GPU: no CUDA here")

STEPS, ROUNDS = 28, 5
SD3_MEDIUM = tiny.SD3_MEDIUM  # 1024²
# Flux.1-dev: 19 double + 38 single blocks, hidden 3072 (24 × 128), T5 512 tokens × 4096; 1024² = 64² packed tokens.
FLUX_DEV = tiny.FluxShape(num_layers=19, num_single_layers=38, heads=24, head_dim=128, latent_size=128,
                          text_tokens=512, joint_attention_dim=4096, pooled_dim=768)


_BUILT = {}


def _pipeline(name):
    """The shaped pipeline, built once per session (a 2–12 B-parameter model)."""
    if name not in _BUILT:
        _BUILT[name] = _build(name)
    return _BUILT[name]


def _build(name):
    torch.set_default_device("cuda")  # random init on the GPU: a 2–12 B-parameter model initialises in seconds
    try:
        if name == "sd3":
            pipe, shape, scale = tiny.sd3_pipeline(SD3_MEDIUM, dtype=torch.bfloat16, with_vae=False), SD3_MEDIUM, "guidance_scale"
        else:
            pipe, shape, scale = tiny.flux_pipeline(FLUX_DEV, dtype=torch.bfloat16, with_vae=False), FLUX_DEV, "true_cfg_scale"
    finally:
        torch.set_default_device(None)
    pipe.to("cuda")
    kw = {k: v.to("cuda") for k, v in tiny.embeddings(shape, dtype=torch.bfloat16).items()}
    kw.update(tiny.image_size(pipe, shape), num_inference_steps=STEPS, output_type="latent", **{scale: 5.0})
    return pipe, kw


def assert_stock(model):
    """Nothing of s2fast's or torch.compile's is left on the model: the stock baseline must time stock blocks (a
    compiled case sets ``_compiled_call_impl`` on the blocks of the shared transformer)."""
    compiled = [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert not compiled, f"the stock baseline would run compiled modules: {compiled[:3]}"


def _case(pipe, kw, setup, first_peak_only=False, check=None):
    """A case: set the pipeline up, then time one call with CUDA events (and record its peak memory, allocated and
    reserved: the largest over calls, or the first call's when ``first_peak_only``)."""
    peak = {}

    def case():
        setup()
        if check is not None:
            check()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pipe(**kw, generator=torch.Generator("cuda").manual_seed(0))
        end.record()
        end.synchronize()
        if not (first_peak_only and "MiB" in peak):
            peak["MiB"] = max(peak.get("MiB", 0), torch.cuda.max_memory_allocated() / 2**20)
            peak["reserved_MiB"] = max(peak.get("reserved_MiB", 0), torch.cuda.max_memory_reserved() / 2**20)
        return start.elapsed_time(end) / 1e3

    return case, peak


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_end_to_end_vs_stock_cfg(interleaved, name):
    torch.set_grad_enabled(False)
    pipe, kw = _pipeline(name)
    s2 = S2Config(omega=0.25, seed=0)
    # Stock CFG runs on a sibling pipeline sharing the components: calls from a pipeline that is not the wrapped
    # one take the stock forward, so the s2fast cases never unwrap between rounds (unwrap releases the block
    # graphs; a re-wrap keeps them, so every round after the warm-up replays the graphs it captured).
    stock = type(pipe)(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    setups = {
        # a re-wrap without compile_blocks: the compiled case's blocks get their own forward back, graphs stay
        "stock-cfg": lambda: s2fast.wrap(pipe, s2),
        "s2fast-cfg": lambda: s2fast.wrap(pipe, s2.replace(omega=0.0)),
        "s2fast-s2": lambda: s2fast.wrap(pipe, s2),
        "s2fast-s2-no-graphs": lambda: s2fast.wrap(pipe, s2.replace(cuda_graphs=False)),
        "s2fast-s2-compiled-blocks": lambda: s2fast.wrap(pipe, s2.replace(compile_blocks="inductor")),
        "s2fast-s2-compiled-no-graphs": lambda: s2fast.wrap(pipe, s2.replace(compile_blocks="inductor", cuda_graphs=False)),
        "s2fast-s2-no-fused-step": lambda: s2fast.wrap(pipe, s2.replace(fused_step=False)),
        "naive-three-pass-s2": lambda: wrap_three_pass(pipe, s2.replace(cuda_graphs=False)),
    }
    cases, peaks = {}, {}
    for case_name, setup in setups.items():
        # stock CFG's peak is its first call's, before any s2fast graphs exist on the device
        is_stock = case_name == "stock-cfg"
        cases[case_name], peaks[case_name] = _case(stock if is_stock else pipe, kw, setup, first_peak_only=is_stock,
                                                   check=(lambda: assert_stock(pipe.transformer)) if is_stock else None)
    s2fast.unwrap(pipe)
    cases["stock-cfg"]()  # the clean first call: nothing of s2fast's is allocated
    summary = interleaved(f"{name} 1024² {STEPS} steps bf16", cases, "stock-cfg", ROUNDS, self_timed=True)
    s2fast.wrap(pipe, s2)
    pipe(**kw)
    masks = s2fast.trace(pipe)
    stats = s2fast.graph_stats(pipe)
    s2fast.unwrap(pipe)
    blocks = len(pipe.transformer.transformer_blocks) + len(getattr(pipe.transformer, "single_transformer_blocks", []))
    floor = sum(block_rows(blocks, 2, (m,) if m else ()) for m in masks) / (2 * blocks * STEPS)
    for case_name, r in summary.items():
        r["peak_MiB"] = peaks[case_name]["MiB"]
        r["reserved_MiB"] = peaks[case_name]["reserved_MiB"]
    summary["s2fast-s2"]["graph_pool_MiB"] = stats["pool_bytes"] / 2**20
    summary["s2fast-s2"]["static_MiB"] = stats["static_bytes"] / 2**20
    summary["s2fast-s2"]["floor_ratio"] = floor  # the block-row floor of the masks drawn (docs/PERFORMANCE.md)
    print(f"\n{name}: S² masks {masks}; block-row floor {floor:.3f}× CFG; graphs {stats}")


# First dropped block k of two dropped blocks (drop_ratio 0.1 of 23 droppable): E[k] = 8, the worst 1, a late 20.
STEP_MASKS = {"k8": (8, 15), "k1": (1, 12), "k20": (20, 22)}


def _timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def case():
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return case


@pytest.mark.parametrize("mask_name", STEP_MASKS)
def test_step_vs_floor_sd3_medium(interleaved, mask_name):
    """One denoising step's transformer work at SD3-medium 1024² (bf16): the target is s2fast S² ≤ 1.03 × its
    block-row floor × s2fast CFG, both with block graphs, in the same run. Launch overhead is included (events
    around the host call), since that is what graphs remove."""
    torch.set_grad_enabled(False)
    pipe, kw = _pipeline("sd3")
    model, adapter = pipe.transformer, SD3Adapter()
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, 128, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    stacked = dict(hidden_states=torch.cat([x, x]), timestep=torch.full((2,), 500.0, device="cuda"),
                   encoder_hidden_states=torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]]),
                   pooled_projections=torch.cat([kw["negative_pooled_prompt_embeds"], kw["pooled_prompt_embeds"]]),
                   joint_attention_kwargs=None)
    rows = BranchRows(adapter.batched_inputs, 2, stacked=stacked)
    mask = [STEP_MASKS[mask_name]]
    graphed = EngineOptions(graphs=BlockGraphs(CudaGraphBackend()))
    cases = {
        "cfg-stock": _timed(lambda: model(**stacked, return_dict=False)),
        "cfg-s2fast-graphs": _timed(lambda: predict(adapter, model, rows, [], graphed)),
        "cfg-s2fast-eager": _timed(lambda: predict(adapter, model, rows, [])),
        "s2-s2fast-graphs": _timed(lambda: predict(adapter, model, rows, mask, graphed)),
        "s2-s2fast-eager": _timed(lambda: predict(adapter, model, rows, mask)),
        "s2-naive-three-pass": _timed(lambda: three_pass(adapter, model, rows, mask, EngineOptions())),
    }
    summary = interleaved(f"sd3-medium 1024² step, mask {mask[0]}", cases, "cfg-s2fast-graphs", 2 * ROUNDS,
                          self_timed=True)
    floor = block_rows(24, 2, mask) / 48
    for name in ("s2-s2fast-graphs", "s2-s2fast-eager"):
        summary[name]["floor_ratio"] = floor  # target: ratio ≤ 1.03 × floor for the graphed case
    summary["s2-naive-three-pass"]["floor_ratio"] = block_rows(24, 2, mask, reuse_prefix=False) / 48
    print(f"\nblock graphs: {graphed.graphs.stats.as_dict()}")


# --- Wan video (per step) ----------------------------------------------------------------------------------------
# Wan 2.1 1.3B at 480p, 81 frames: 30 blocks, hidden 1536 (12 heads × 128), FFN 8960, 21 latent frames of 60 × 104
# = 32 760 video tokens, 512 text tokens × 4096. Wan 2.1 14B at 720p, 81 frames: 40 blocks, hidden 5120 (40 × 128),
# FFN 13 824, 21 × 90 × 160 latents = 75 600 tokens. bf16 weights: 2.8 GB and 28.6 GB.
# Wan 2.2 A14B is two such 14B experts (57 GB of bf16 weights): both fit one 80 GB H100 or a 141 GB H200 with the
# eager S² step's activations at 720p (three rows of 774 MB hidden states plus one block's temporaries), but not
# with block graphs at 720p: a graph keeps its block's output per lane, 40 blocks × 3 rows × 774 MB ≈ 93 GB.
WAN_SHAPES = {
    "wan2.1-1.3b-480p": tiny.WanShape(num_layers=30, heads=12, head_dim=128, latent_frames=21, latent_size=60,
                                      latent_width=104, text_tokens=512, text_dim=4096, ffn_dim=8960),
    "wan2.1-14b-720p": tiny.WanShape(num_layers=40, heads=40, head_dim=128, latent_frames=21, latent_size=90,
                                     latent_width=160, text_tokens=512, text_dim=4096, ffn_dim=13824),
}
# (shape, mask): every mask on 1.3B; the mean-k mask on 14B (a step there takes seconds)
WAN_CASES = [(s, m) for s in WAN_SHAPES for m in (STEP_MASKS if s.endswith("480p") else ("k8",))]


def wan_step_inputs(shape, device="cuda", dtype=torch.bfloat16):
    """A random WanTransformer3DModel of ``shape`` and the [uncond, cond] rows of one step (batch 1 each)."""
    from s2fast.adapters.wan import WanAdapter

    torch.manual_seed(0)
    torch.set_default_device(device)  # random init on the device: a 14 B-parameter model initialises in seconds
    try:
        model = tiny.wan_transformer(shape).to(dtype)
    finally:
        torch.set_default_device(None)
    adapter = WanAdapter()
    emb = {k: v.to(device) for k, v in tiny.wan_embeddings(shape, dtype=dtype).items()}
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(1, 16, shape.latent_frames, shape.latent_size, shape.width, generator=g, device=device, dtype=dtype)
    cond = dict(hidden_states=x, timestep=torch.full((1,), 500.0, device=device),
                encoder_hidden_states=emb["prompt_embeds"], encoder_hidden_states_image=None, attention_kwargs=None)
    uncond = dict(cond, encoder_hidden_states=emb["negative_prompt_embeds"])
    return model, adapter, BranchRows(adapter.batched_inputs, 2, branches=[uncond, cond])


def wan_step_cases(model, adapter, rows, mask, graphs=None):
    """Zero-argument callables, one per case: the pipeline's own two batch-1 calls (cond, then uncond), the naive
    three batch-1 calls, and s2fast's batched step (eager, and with block graphs when ``graphs`` is given)."""
    from s2fast.reference import skipping

    def forward(inputs):
        return model(**inputs, return_dict=False)[0]

    def naive():
        forward(rows.branch(1)), forward(rows.branch(0))
        with skipping(adapter, adapter.blocks(model), mask[0]):
            return forward(rows.branch(1))

    cases = {
        "cfg-stock": lambda: (forward(rows.branch(1)), forward(rows.branch(0))),
        "cfg-s2fast-eager": lambda: predict(adapter, model, rows, []),
        "s2-s2fast-eager": lambda: predict(adapter, model, rows, mask),
        "s2-naive-three-pass": naive,
    }
    if graphs is not None:
        options = EngineOptions(graphs=graphs)
        cases["cfg-s2fast-graphs"] = lambda: predict(adapter, model, rows, [], options)
        cases["s2-s2fast-graphs"] = lambda: predict(adapter, model, rows, mask, options)
    return cases


@pytest.mark.parametrize("shape_name,mask_name", WAN_CASES)
def test_step_vs_floor_wan(interleaved, shape_name, mask_name):
    """One denoising step's transformer work at Wan video shapes (bf16): s2fast S² against the stock loop's two
    calls and against the block-row floor, in the same run. Block graphs only at 480p (see WAN_SHAPES)."""
    torch.set_grad_enabled(False)
    shape = WAN_SHAPES[shape_name]
    model, adapter, rows = wan_step_inputs(shape)
    mask = [STEP_MASKS[mask_name]]
    graphs = BlockGraphs(CudaGraphBackend()) if shape_name.endswith("480p") else None
    cases = {name: _timed(fn) for name, fn in wan_step_cases(model, adapter, rows, mask, graphs).items()}
    rounds = 2 * ROUNDS if shape_name.endswith("480p") else 3
    summary = interleaved(f"{shape_name} step, mask {mask[0]}", cases, "cfg-stock", rounds, self_timed=True)
    L = shape.num_layers
    for name in summary:
        if name.startswith("s2-s2fast"):
            summary[name]["floor_ratio"] = block_rows(L, 2, mask) / (2 * L)
    summary["s2-naive-three-pass"]["floor_ratio"] = block_rows(L, 2, mask, reuse_prefix=False) / (2 * L)
    if graphs is not None:
        print(f"\nblock graphs: {graphs.stats.as_dict()}")
    del model
    torch.cuda.empty_cache()


# The launch-bound regime: where a step costs per block call, separate sub-network lanes cost a call per block they
# run, joined ones none; fork_mode "auto" (the default) should pick the faster within its memory bound.
LAUNCH_CASES = [("sd3", 512), ("sd3", 1024), ("flux", 512)]


@pytest.mark.parametrize("name,side", LAUNCH_CASES)
def test_fork_modes_by_image_size(interleaved, name, side):
    """Whole calls at ``side``²: stock CFG, s2fast CFG, and S² with fork_mode separate, join and auto (the same
    masks), with each case's peak memory and both floors (block rows, block calls) of the masks drawn. Targets:
    S² with "auto" ≤ 1.15 × stock CFG where calls dominate, its peak ≤ stock + 10 % where "separate" meets it."""
    torch.set_grad_enabled(False)
    pipe, kw = _pipeline(name)
    kw = dict(kw, height=side, width=side)
    s2 = S2Config(omega=0.25, seed=0)
    stock = type(pipe)(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    setups = {
        "stock-cfg": lambda: s2fast.unwrap(pipe),
        "s2fast-cfg": lambda: s2fast.wrap(pipe, s2.replace(omega=0.0)),
        "s2-separate": lambda: s2fast.wrap(pipe, s2.replace(fork_mode="separate")),
        "s2-join": lambda: s2fast.wrap(pipe, s2.replace(fork_mode="join")),
        "s2-auto": lambda: s2fast.wrap(pipe, s2),
    }
    cases, peaks = {}, {}
    for case_name, setup in setups.items():
        is_stock = case_name == "stock-cfg"
        cases[case_name], peaks[case_name] = _case(stock if is_stock else pipe, kw, setup, first_peak_only=is_stock)
    cases["stock-cfg"]()  # the clean first call: stock's peak before any s2fast graphs exist
    summary = interleaved(f"{name} {side}² {STEPS} steps bf16, fork modes", cases, "stock-cfg", ROUNDS,
                          self_timed=True)
    s2fast.wrap(pipe, s2)
    pipe(**kw)
    masks = s2fast.trace(pipe)
    chosen = s2fast.serving.controller_of(pipe)._run.memo.get(("fork_mode", id(pipe.transformer)), "separate")
    s2fast.unwrap(pipe)
    blocks = len(pipe.transformer.transformer_blocks) + len(getattr(pipe.transformer, "single_transformer_blocks", []))
    steps = [(m,) if m else () for m in masks]
    floor = sum(block_rows(blocks, 2, s) for s in steps) / (2 * blocks * STEPS)
    separate_calls = sum(blocks + sum(blocks - min(m) - len(m) for m in s) for s in steps) / (blocks * STEPS)
    for case_name, r in summary.items():
        r["peak_MiB"] = peaks[case_name]["MiB"]
        r["reserved_MiB"] = peaks[case_name]["reserved_MiB"]
        if case_name.startswith("s2-"):
            r["floor_ratio"] = floor
            mode = case_name[3:] if case_name != "s2-auto" else chosen
            r["call_floor"] = separate_calls if mode == "separate" else 1.0
            r["joined"] = float(mode == "join")
    print(f"\n{name} {side}²: auto chose {chosen!r}; block-row floor {floor:.3f}, separate's call floor "
          f"{separate_calls:.3f}")


# Qwen-Image and Flux.2 at 1024² (bf16, random weights): one denoising step's transformer work, as for Wan above.
# Qwen-Image (20 B): 60 dual-stream blocks, hidden 3072 (24 × 128), Qwen2.5-VL context 3584 wide (256 tokens here);
# 1024² = 128² latents packed 2×2 = 4096 image tokens. 41 GB of bf16 weights. Its loop makes two batch-1 calls per
# step (true CFG), cond then uncond.
# Flux.2-dev (32 B): 8 double + 48 single blocks, hidden 6144 (48 × 128), Mistral context 15 360 wide (512 tokens);
# 1024² = 64² packed tokens. 64 GB of bf16 weights: built after Qwen-Image is freed. Guidance-distilled: one cond
# call per step, so S² is cond + one sub-network (floor (2L − k − d) / L).
FAMILY_SHAPES = {
    "qwen-image-1024": tiny_families.QwenShape(num_layers=60, heads=24, head_dim=128, axes_dims_rope=(16, 56, 56),
                                               latent_size=128, latent_channels=16, text_tokens=256,
                                               joint_attention_dim=3584),
    "flux2-dev-1024": tiny_families.Flux2Shape(num_layers=8, num_single_layers=48, heads=48, head_dim=128,
                                               axes_dims_rope=(32, 32, 32, 32), latent_size=128, latent_channels=32,
                                               text_tokens=512, joint_attention_dim=15360),
}
# drop_ratio 0.1: six blocks of 59 (Qwen-Image) or 55 (Flux.2) droppable; the first at E[k] ≈ 8
FAMILY_MASKS = {"qwen-image-1024": (8, 17, 26, 35, 44, 53), "flux2-dev-1024": (8, 16, 24, 32, 40, 48)}


def family_step_inputs(name, device="cuda", dtype=torch.bfloat16):
    """A random transformer of FAMILY_SHAPES[name], its adapter and one step's rows at batch 1 ([uncond, cond] for
    Qwen-Image, [cond] for guidance-distilled Flux.2)."""
    from s2fast.adapters.flux2 import Flux2Adapter
    from s2fast.adapters.qwenimage import QwenImageAdapter

    shape = FAMILY_SHAPES[name]
    torch.manual_seed(0)
    torch.set_default_device(device)
    try:
        if name.startswith("qwen"):
            model, adapter = tiny_families.qwen_transformer(shape).to(dtype), QwenImageAdapter()
        else:
            model, adapter = tiny_families.flux2_transformer(shape).to(dtype), Flux2Adapter()
    finally:
        torch.set_default_device(None)
    g = torch.Generator(device).manual_seed(0)
    tokens = (shape.latent_size // 2) ** 2
    x = torch.randn(1, tokens, shape.latent_channels * 4, generator=g, device=device, dtype=dtype)
    text = lambda: torch.randn(1, shape.text_tokens, shape.joint_attention_dim, generator=g, device=device,  # noqa: E731
                               dtype=dtype)
    t = torch.full((1,), 0.5, device=device)
    if name.startswith("qwen"):
        side = shape.latent_size // 2
        cond = dict(hidden_states=x, timestep=t, encoder_hidden_states=text(), img_shapes=[[(1, side, side)]],
                    attention_kwargs={})
        uncond = dict(cond, encoder_hidden_states=text())
        return model, adapter, BranchRows(adapter.batched_inputs, 2, branches=[uncond, cond])
    side = torch.arange(shape.latent_size // 2, device=device)
    img_ids = torch.stack(torch.broadcast_tensors(torch.zeros_like(side)[:, None], side[:, None], side[None, :],
                                                  torch.zeros_like(side)[None, :]), dim=-1).reshape(-1, 4)
    txt_ids = torch.zeros(shape.text_tokens, 4, device=device, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(shape.text_tokens, device=device)
    cond = dict(hidden_states=x, timestep=t, guidance=torch.full((1,), 4.0, device=device), encoder_hidden_states=text(),
                img_ids=img_ids, txt_ids=txt_ids, joint_attention_kwargs=None)
    return model, adapter, BranchRows(adapter.batched_inputs, 1, branches=[cond])


def family_step_cases(model, adapter, rows, mask):
    """The pipeline's own calls (one per branch, batch 1), the naive three-pass (one more batch-1 call with the
    masked blocks skipped) and s2fast's step, eager."""
    from s2fast.reference import skipping

    def forward(inputs):
        return model(**inputs, return_dict=False)[0]

    cond = rows.cond_branch

    def stock():
        return [forward(rows.branch(j)) for j in reversed(range(rows.count))]  # cond first, as the loops call

    def naive():
        stock()
        with skipping(adapter, adapter.blocks(model), mask[0]):
            return forward(rows.branch(cond))

    return {
        "cfg-stock": stock,
        "cfg-s2fast-eager": lambda: predict(adapter, model, rows, []),
        "s2-s2fast-eager": lambda: predict(adapter, model, rows, mask),
        "s2-naive-three-pass": naive,
    }


@pytest.mark.parametrize("shape_name", FAMILY_SHAPES)
def test_step_vs_floor_families(interleaved, shape_name):
    """One denoising step's transformer work at Qwen-Image and Flux.2-dev 1024² (bf16): s2fast S² against the
    stock loop's calls and against the block-row floor, in the same run (eager: no block graphs)."""
    torch.set_grad_enabled(False)
    model, adapter, rows = family_step_inputs(shape_name)
    mask = [FAMILY_MASKS[shape_name]]
    cases = {name: _timed(fn) for name, fn in family_step_cases(model, adapter, rows, mask).items()}
    summary = interleaved(f"{shape_name} step, mask {mask[0]}", cases, "cfg-stock", 3, self_timed=True)
    L, branches = adapter.num_blocks(model), rows.count
    summary["s2-s2fast-eager"]["floor_ratio"] = block_rows(L, branches, mask) / (branches * L)
    summary["s2-naive-three-pass"]["floor_ratio"] = block_rows(L, branches, mask, reuse_prefix=False) / (branches * L)
    del model
    torch.cuda.empty_cache()
