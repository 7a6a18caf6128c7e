"""A class-conditional residual-MLP denoiser for the toy mixtures, trained with flow matching, run through s2fast.

The model is one more family for s2fast's engine (``ToyAdapter``): its residual blocks are the blocks a
sub-network skips (a skipped block passes its input through, like a transformer block). Sampling uses the engine
for the predictions and ``guided_flow_step`` for Eq. 4 and the Euler update, so the toys exercise the same code as
the pipelines instead of a separate implementation of the guidance.

Flow matching as diffusers' FlowMatchEuler uses it: x_σ = (1 − σ) x_0 + σ ε, the model predicts v = ε − x_0, and
sampling steps σ from 1 to 0 with x ← x + (σ_next − σ) v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from s2fast.kernels import guided_flow_step
from torch import nn

from s2fast.adapters.base import BranchRows, LaneState, ModelAdapter
from s2fast.config import S2Config
from s2fast.engine import EngineOptions, predict
from s2fast.masks import schedule

from .toys import Mixture


class ResidualBlock(nn.Module):
    """h + MLP(adaLN(h; c)): the condition c (time + class) scales and shifts the normalised input."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(hidden, 2 * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(c).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class ToyDenoiser(nn.Module):
    def __init__(self, dim: int, num_classes: int, hidden: int = 128, num_blocks: int = 8, frequencies: int = 16):
        super().__init__()
        self.dim, self.num_classes, self.frequencies = dim, num_classes, frequencies
        self.x_in = nn.Linear(dim, hidden)
        self.t_mlp = nn.Sequential(nn.Linear(2 * frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden)  # the last index is the null (unconditional) class
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def embed(self, x, sigma, labels) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), self.frequencies, device=x.device))
        angles = sigma[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1)) + self.class_emb(labels)
        return self.x_in(x), c

    def head(self, h):
        return self.proj_out(self.norm_out(h))

    def forward(self, x, sigma, labels):
        h, c = self.embed(x, sigma, labels)
        for block in self.blocks:
            h = block(h, c)
        return self.head(h)


class ToyAdapter(ModelAdapter):
    """ToyDenoiser for s2fast's engine: the flow is [h], the per-row constant is the condition c."""

    model_classes = ("ToyDenoiser",)
    batched_inputs = ("hidden_states", "timestep", "labels")

    def blocks(self, model):
        return list(model.blocks)

    def embed(self, model, inputs):
        h, c = model.embed(inputs["hidden_states"], inputs["timestep"], inputs["labels"])
        return LaneState([h], [c], {})

    def run_block(self, block, flow, row_consts, shared):
        return [block(flow[0], row_consts[0])]

    def head(self, model, state):
        return model.head(state.flow[0])

    def skipped_block_output(self, args, kwargs):
        return args[0]  # a ToyDenoiser block is called as block(h, c) and returns h


# --- training ----------------------------------------------------------------------------------------------------
@dataclass
class Trained:
    model: ToyDenoiser
    weak: ToyDenoiser        # an earlier checkpoint: AutoGuidance's "bad version of the model"
    losses: List[float]


@torch.enable_grad()  # whatever the caller's grad mode (the demo and benchmarks turn it off globally)
def train(mixture: Mixture, *, steps: int = 3000, batch: int = 1024, lr: float = 2e-3, p_uncond: float = 0.2,
          weak_fraction: float = 0.1, seed: int = 0, hidden: int = 128, num_blocks: int = 8) -> Trained:
    """Flow-matching training with class dropout (p_uncond) so the same model gives the unconditional prediction."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ToyDenoiser(mixture.dim, mixture.num_classes, hidden, num_blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    weak, losses = None, []
    for step in range(steps):
        labels = torch.randint(0, mixture.num_classes, (batch,), generator=g)
        x0 = mixture.sample(labels, g)
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(batch, generator=g)
        x = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        dropped = torch.rand(batch, generator=g) < p_uncond
        loss = (model(x, sigma, torch.where(dropped, model.null_class, labels)) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step + 1 == max(1, int(weak_fraction * steps)):
            weak = _copy(model)
    return Trained(model.eval(), weak.eval(), losses)


def _copy(model: ToyDenoiser) -> ToyDenoiser:
    clone = ToyDenoiser(model.dim, model.num_classes, model.x_in.out_features, len(model.blocks), model.frequencies)
    clone.load_state_dict(model.state_dict())
    return clone


# --- sampling ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Guidance:
    """One guidance method. kind: "none" (cond only), "cfg", "s2" (Eq. 4, random masks; num_masks > 1 is naive
    S²), "skip" (a fixed block skipped at every step, skip-layer style), "auto" (AutoGuidance with the weak model)."""

    kind: str
    lam: float = 1.0
    omega: float = 0.0
    num_masks: int = 1
    block: Optional[int] = None
    drop_ratio: float = 0.1
    seed: int = 0

    @property
    def label(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "skip":
            return f"skip[{self.block}] λ={self.lam} ω={self.omega}"
        if self.kind == "s2":
            name = "S²" if self.num_masks == 1 else f"naive S² (N={self.num_masks})"
            return f"{name} λ={self.lam} ω={self.omega}"
        return f"{self.kind} λ={self.lam}"


KINDS = ("none", "cfg", "s2", "skip", "auto")


def subnet_schedule(guidance: Guidance, steps: int, num_blocks: int) -> List[Tuple[Tuple[int, ...], ...]]:
    if guidance.kind == "skip":
        return [((guidance.block,),)] * steps
    if guidance.kind != "s2" or guidance.omega == 0:
        return [()] * steps
    config = S2Config(omega=guidance.omega, drop_ratio=guidance.drop_ratio, num_masks=guidance.num_masks,
                      seed=guidance.seed)
    return schedule(config, steps, num_blocks)


@torch.no_grad()
def sample(trained: Trained, labels: torch.Tensor, guidance: Guidance, *, steps: int = 32, seed: int = 0,
           keep_trajectory: bool = False) -> Dict[str, torch.Tensor]:
    """Samples for ``labels`` with ``guidance``; {"samples": (n, dim), "trajectory": (steps + 1, n, dim) if kept}."""

    if guidance.kind not in KINDS:
        raise ValueError(f"Guidance.kind must be one of {KINDS}, got {guidance.kind!r}")
    model, adapter = trained.model, ToyAdapter()
    n = len(labels)
    x = torch.randn(n, model.dim, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    subnets = subnet_schedule(guidance, steps, len(model.blocks))
    null = torch.full_like(labels, model.null_class)
    trajectory = [x] if keep_trajectory else None
    for i in range(steps):
        sigma = sigmas[i].expand(n)
        branches = [dict(hidden_states=x, timestep=sigma, labels=labels)]
        if guidance.kind in ("cfg", "s2", "skip"):
            branches.insert(0, dict(hidden_states=x, timestep=sigma, labels=null))
        rows = BranchRows(ToyAdapter.batched_inputs, len(branches), branches=branches)
        preds = predict(adapter, model, rows, subnets[i], EngineOptions())
        cond, subs = preds[len(branches) - 1], preds[len(branches):]
        uncond = preds[0] if len(branches) == 2 else None
        if guidance.kind == "auto":
            uncond = trained.weak(x, sigma, labels)  # D = W + λ(C − W)
        sub = None if not subs else (subs[0] if len(subs) == 1 else torch.stack(subs))
        x = guided_flow_step(x, cond, dt=(sigmas[i + 1] - sigmas[i]), uncond=uncond, sub=sub,
                             guidance_scale=guidance.lam if uncond is not None else None, omega=guidance.omega,
                             mode="fp32", backend="torch")
        if keep_trajectory:
            trajectory.append(x)
    out = {"samples": x}
    if keep_trajectory:
        out["trajectory"] = torch.stack(trajectory)
    return out


def methods(lams: Sequence[float], omegas: Sequence[float], num_blocks: int) -> List[Guidance]:
    """The report's grid: none; CFG per λ; S² and naive S² (N = 4) per (λ, ω); a fixed skip of every block and
    AutoGuidance per λ."""
    out = [Guidance("none")]
    for lam in lams:
        out.append(Guidance("cfg", lam))
        out.append(Guidance("auto", lam))
        for omega in omegas:
            out.append(Guidance("s2", lam, omega))
            out.append(Guidance("s2", lam, omega, num_masks=4))
            out += [Guidance("skip", lam, omega, block=b) for b in range(num_blocks)]
    return out
