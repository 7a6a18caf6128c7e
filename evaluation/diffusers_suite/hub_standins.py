"""Offline stand-ins for the hub repositories diffusers' fast pipeline tests load (tiny tokenizers, a tiny T5
encoder, Qwen2-VL's processor): each is built from a config here and saved into a hub cache folder laid out as the
hub client lays out a download, so that ``from_pretrained("hf-internal-testing/tiny-random-t5")`` finds it with
HF_HUB_OFFLINE=1 and nothing is downloaded.

A stand-in keeps what the tests rely on (class, hidden sizes, special-token ids a model config names) but not the
hub repository's weights or vocabulary: a test comparing an output with numbers recorded from the hub's models
fails with the stand-in, stock and wrapped alike, and the comparison between the two is what the harness reports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict

import torch

from s2fast.tiny_tokenizers import clip_tokenizer, qwen2_tokenizer, t5_tokenizer

# One revision name for every stand-in: the hub client resolves refs/main to it.
REVISION = "0" * 40
# Bump when a builder changes: a cache folder built by another version is rebuilt.
BUILD_VERSION = "2"


def _t5(path: Path) -> None:
    """T5 tokenizer and a T5 encoder of d_model 32 (the tests' joint_attention_dim / text_dim). No dropout: the tests
    build the encoder from this config in training mode and compare two pipeline calls at 1e-4, which dropout
    would make differ by the draw of torch's global generator."""
    from transformers import T5Config, T5EncoderModel

    tok = t5_tokenizer()
    tok.save_pretrained(path)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                            eos_token_id=1, dropout_rate=0.0)).save_pretrained(path)


def _clip(path: Path) -> None:
    """CLIP tokenizer (514 tokens: below the tests' CLIP vocab_size 1000)."""
    clip_tokenizer().save_pretrained(path)


def _qwen2_vl(path: Path) -> None:
    """Qwen2 tokenizer and, where transformers can build it here, Qwen2-VL's processor over it. The processor needs
    a video processor, which needs torchvision: without it the tests that load the processor (Qwen-Image Edit
    Plus) fail stock and wrapped alike."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    tok = qwen2_tokenizer()
    tok.save_pretrained(path)
    try:
        from transformers import Qwen2VLVideoProcessor

        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                                     video_processor=Qwen2VLVideoProcessor(), chat_template=tok.chat_template)
    except (ImportError, AttributeError):  # no torchvision
        return
    processor.save_pretrained(path)


STANDINS: Dict[str, Callable[[Path], None]] = {
    "hf-internal-testing/tiny-random-t5": _t5,
    "hf-internal-testing/tiny-random-clip": _clip,
    "hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration": _qwen2_vl,
}


def build_cache(cache: Path) -> Path:
    """Build every stand-in under ``cache`` (a hub cache folder: set HF_HUB_CACHE to it) unless built already by
    this BUILD_VERSION; returns ``cache``."""
    stamp = cache / f".s2fast-standins-{BUILD_VERSION}"
    if stamp.exists():
        return cache
    for repo_id, build in STANDINS.items():
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        build(snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(REVISION)
    stamp.write_text("built\n")
    return cache


def default_cache() -> Path:
    return Path(os.environ.get("S2FAST_SUITE_HUB_CACHE", "/tmp/s2fast-diffusers-suite-hub"))
