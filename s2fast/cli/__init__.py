"""The s2fast command: generate images and videos with CFG or S² from any supported checkpoint, time the methods
on it, and run the demo.

    s2fast generate MODEL --prompt TEXT --out DIR [--method cfg|s2|sgg] [--compare] [--prompts FILE]
                    [--image PATH] [--mask PATH] [--video PATH] [--frames N] ...
    s2fast bench MODEL [--steps N] [--rounds R] [--json FILE]
    s2fast ui [MODEL] [--port PORT]
    s2fast demo [demo options]

MODEL is a local diffusers folder, a Hugging Face hub id (diffusers' own loading and cache; HF_HUB_OFFLINE is
respected) or ``digits``, the embedded model. This module imports no torch: ``--help`` and option errors answer
at once, and the subcommand's module (which imports torch) loads only after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

from .errors import UserError
from .families import FAMILIES
from .methods import METHODS

DTYPES = ("auto", "bf16", "fp16", "fp32")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must lie in 0..2**63-1, got {value}")
    return value


def _finite(minimum: float, strict: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '≥'} {minimum:g}, got {text}")
        return value
    return parse


def _blocks(text: str) -> tuple:
    try:
        blocks = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices separated by commas, e.g. 7,8,9, got {text!r}") from None
    if any(b < 0 for b in blocks):
        raise argparse.ArgumentTypeError(f"block indices must be ≥ 0, got {text}")
    return blocks


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must lie in 1..65535, got {value}")
    return value


def _model_options(p: argparse.ArgumentParser, default_model: Optional[str] = None) -> None:
    p.add_argument("model", metavar="MODEL", nargs=None if default_model is None else "?", default=default_model,
                   help="a local diffusers pipeline folder, a hub id (e.g. stabilityai/stable-diffusion-3.5-medium), "
                        "or 'digits' (the embedded MNIST DiT)" + ("" if default_model is None else f"; default {default_model}"))
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and activations: auto = bf16 on a GPU, fp32 on the CPU (default auto)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu; under accelerate/torchrun each process "
                        "takes its own)")
    p.add_argument("--offload", choices=("model",), default=None,
                   help="'model': diffusers' model CPU offload (each model moves to the device while it runs)")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None,
                   help="the prompt; for class-conditional pipelines a class name or id (DiT: an ImageNet label, "
                        "digits: 0-9)")
    p.add_argument("--negative-prompt", default=None, help="the negative prompt (text pipelines)")
    p.add_argument("--omega", type=_finite(0, False), default=0.25, help="S² scale ω (default 0.25, the paper's)")
    p.add_argument("--drop-ratio", type=_finite(0, True), default=0.1,
                   help="fraction of blocks each S² sub-network skips (default 0.1)")
    p.add_argument("--skip-blocks", type=_blocks, default=None,
                   help="SGG: the blocks its skip pass skips, comma-separated (default: SD3-medium's 7,8,9 of 24 "
                        "blocks, scaled to the model's depth: 2 on the 6-block digits model)")
    p.add_argument("--skip-scale", type=_finite(-math.inf, False), default=3.0,
                   help="SGG: the scale of its skip term (default 3.0)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps (generate: the pipeline's default; bench: 10)")
    p.add_argument("--guidance", type=_finite(0, False), default=None,
                   help="CFG scale λ (default: the pipeline's; Flux: its true_cfg_scale, with an empty negative "
                        "prompt unless one is given)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="noise seed (prompt i of a --prompts file uses seed + i) and S² mask seed (default 0)")
    p.add_argument("--height", type=_positive_int, default=None, help="image height (text pipelines)")
    p.add_argument("--width", type=_positive_int, default=None, help="image width (text pipelines)")
    p.add_argument("--frames", type=_positive_int, default=None,
                   help="frames (Wan: 4k+1; video-to-video: the first N frames of --video)")
    p.add_argument("--fps", type=_positive_int, default=None,
                   help="frames per second of the MP4 (default the model's: 16, Wan 2.2 TI2V 24)")
    p.add_argument("--guidance-2", type=_finite(0, False), default=None,
                   help="Wan 2.2: λ of the second (low-noise) expert (default: the pipeline's)")
    p.add_argument("--image", action="append", metavar="PATH", default=None,
                   help="input image (image-to-image, inpainting, Kontext, Wan image-to-video); repeat it for "
                        "pipelines that take several (Qwen-Image Edit Plus, Flux.2 references)")
    p.add_argument("--mask", metavar="PATH", default=None, help="inpainting mask, white where the model repaints")
    p.add_argument("--video", metavar="PATH", default=None, help="input video (Wan video-to-video)")
    p.add_argument("--strength", type=_finite(0, True), default=None,
                   help="how far from the input image or video the sample moves, in (0, 1] (default: the "
                        "pipeline's)")


def pipelines_help() -> str:
    """The pipelines the command runs, each with the options it takes beyond the common ones."""
    lines = ["pipelines (MODEL's model_index.json names one):"]
    for name, family in FAMILIES.items():
        takes = family.options()
        if family.class_conditional:
            takes.insert(0, "--prompt is a class name or id")
        if family.distilled:
            takes.append("guidance-distilled: --guidance is its guidance embedding, S² without an uncond branch")
        lines.append(f"  {name}" + (f": {'; '.join(takes)}" if takes else ""))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): the message names the option and where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="s2fast", description=__doc__.split("\n\n")[0])
    from s2fast import __version__

    parser.add_argument("--version", action="version", version=f"s2fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{generate,bench,ui,demo}")
    sub.required = True

    gen = sub.add_parser("generate", help="sample images or videos with CFG or S² and write PNGs/MP4s and run.json",
                         description="Sample one image (or video) per prompt with the chosen method; write one PNG "
                                     "(or MP4 and a still) per prompt and run.json (settings, versions, device, "
                                     "per-step and total times, S² masks).",
                         epilog=pipelines_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_options(gen)
    _sampling_options(gen)
    gen.add_argument("--method", choices=tuple(METHODS), default="s2",
                     help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()) + " (default s2)")
    gen.add_argument("--compare", action="store_true",
                     help="also sample CFG from the same noise and write a labelled side-by-side image or video "
                          "(CFG left)")
    gen.add_argument("--cache", type=_finite(0, False), default=None, metavar="THRESHOLD",
                     help="s2 and sgg: a step cache over every branch and sub-network (s2fast.BlockCache with this "
                          "threshold: FirstBlockCache's measure on the cond rows); a step whose first block barely "
                          "changed reuses the last full step's residuals. Changes the output; off by default (0 "
                          "caches no step)")
    gen.add_argument("--correction-every", type=_positive_int, default=1, metavar="K",
                     help="s2: run the sub-networks on every K-th S² step only and reuse their correction between "
                          "(S2Config.correction_every); K > 1 changes the output (default 1)")
    gen.add_argument("--prompts", metavar="FILE", default=None,
                     help="one prompt per line (blank lines skipped); resumable: prompts whose outputs exist are "
                          "skipped")
    gen.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    gen.add_argument("--parallel", choices=("data", "branch"), default="data",
                     help="under torchrun / accelerate launch: 'data' (default) splits the prompts between the "
                          "processes; 'branch' runs every prompt on 2 or 3 processes together, each computing a share "
                          "of every step's passes (S2Config.branch_parallel), and the main process writes the files")

    bench = sub.add_parser("bench", help="time stock CFG, s2fast CFG, naive S² and s2fast S² on MODEL",
                           description="Time stock CFG, s2fast CFG, naive three-pass S² and s2fast S² on MODEL in "
                                       "interleaved rounds; print per-step time, ratio to stock CFG, block-row floor "
                                       "and peak memory, and say when the spread makes a ratio untrustworthy.",
                           epilog=pipelines_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_options(bench)
    _sampling_options(bench)
    bench.set_defaults(steps=10)  # not the pipeline's 28-50: four cases × rounds of full calls
    bench.add_argument("--rounds", type=_positive_int, default=5, help="interleaved timing rounds (default 5)")
    bench.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")

    ui = sub.add_parser("ui", help="a local page comparing CFG and S² or SGG from the same noise (needs s2fast[ui])",
                        description="Serve a page on 127.0.0.1 that samples CFG and S² (or SGG) from the same noise "
                                    "side by side, with per-step times, the masks drawn and a sweep over ω from one "
                                    "seed. Needs the ui extra: pip install 's2fast[ui]' (gradio).")
    _model_options(ui, default_model="digits")
    ui.add_argument("--port", type=_port, default=7860, help="the port on 127.0.0.1 (default 7860)")

    parser.subcommands = {"generate": gen, "bench": bench, "ui": ui}  # for the cross-option errors, in the subcommand's name
    sub.add_parser("demo", help="the digits demo (CFG vs S² on the embedded model); `s2fast demo --help`",
                   add_help=False)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option checks that need no model (the rest are checked once the pipeline is loaded)."""
    parser = parser.subcommands[args.command]
    if args.command == "generate":
        if (args.prompt is None) == (args.prompts is None):
            parser.error("give exactly one of --prompt TEXT and --prompts FILE")
        if args.compare and args.method == "cfg":
            parser.error("--compare samples CFG beside the chosen method: choose another --method than cfg")
        if args.method == "cfg" and (args.cache is not None or args.correction_every != 1):
            parser.error("--cache and --correction-every apply to --method s2 or sgg: --method cfg is the stock "
                         "pipeline, untouched")
        if args.method == "sgg" and args.correction_every != 1:
            parser.error("--correction-every reuses S²'s correction: it applies to --method s2, not sgg")
    if args.command in ("generate", "bench") and args.drop_ratio >= 1:
        parser.error(f"argument --drop-ratio: must be < 1, got {args.drop_ratio:g}")
    if args.command in ("generate", "bench") and args.strength is not None and args.strength > 1:
        parser.error(f"argument --strength: must be ≤ 1, got {args.strength:g}")


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo keeps its own parser (and its --help)
        from s2fast import demo

        sys.exit(_guarded(lambda: demo.main(argv[1:], prog="s2fast demo")))
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    if args.command == "generate":
        from . import generate as command
    elif args.command == "ui":
        from . import ui as command
    else:
        from . import bench as command
    sys.exit(_guarded(lambda: command.run(args)))


def _guarded(run) -> int:
    """Run a subcommand; a problem the user can fix ends with one line on stderr and exit status 1."""
    try:
        run()
    except UserError as e:
        print(f"s2fast: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("s2fast: interrupted (finished outputs are kept)", file=sys.stderr)
        return 130
    return 0
