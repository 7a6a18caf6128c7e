"""Tiny pipelines saved as diffusers folders for the command's tests, built offline: random weights from configs,
and for SD3 and Flux text encoders and tokenizers built from a vocabulary written here (nothing is downloaded)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from s2fast import tiny
from s2fast.tiny_tokenizers import clip_tokenizer, t5_tokenizer

# A DiT's id2label, as ImageNet checkpoints carry it in model_index.json (several names per class, comma-separated).
ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus", "207": "golden retriever"}


def save_dit(path: str) -> str:
    pipe = tiny.dit_pipeline(tiny.DiTShape(num_layers=4))
    pipe.save_pretrained(path)
    _add_to_index(path, id2label=ID2LABEL)
    return path


def _clip_encoder(cls, vocab: int, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    torch.manual_seed(1)
    return cls(CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
                              eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=vocab - 1)).eval()


def _t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    return T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)).eval()


def save_sd3(path: str) -> str:
    """SD3 with two CLIP encoders (hidden 16 each: their concatenation fits the joint dimension 32; pooled 32 + 32
    = the transformer's 64) and a T5 encoder (d_model 32 = the joint dimension)."""
    from transformers import CLIPTextModelWithProjection

    shape = tiny.SD3Shape(num_layers=4)
    pipe = tiny.sd3_pipeline(shape)
    tok = clip_tokenizer()
    vocab = len(tok)
    pipe.register_modules(
        tokenizer=tok, tokenizer_2=tok,
        text_encoder=_clip_encoder(CLIPTextModelWithProjection, vocab, 16, shape.pooled_dim // 2),
        text_encoder_2=_clip_encoder(CLIPTextModelWithProjection, vocab, 16, shape.pooled_dim // 2),
        tokenizer_3=t5_tokenizer(), text_encoder_3=_t5_encoder(shape.joint_attention_dim),
    )
    pipe.save_pretrained(path)
    return path


def _add_to_index(path: str, **entries) -> None:
    index = os.path.join(path, "model_index.json")
    with open(index) as f:
        config = json.load(f)
    config.update(entries)
    with open(index, "w") as f:
        json.dump(config, f)


def save_flux(path: str) -> str:
    """Flux with a CLIP encoder (pooled = hidden 32) and a T5 encoder (d_model 32 = the joint dimension)."""
    from transformers import CLIPTextModel

    shape = tiny.FluxShape()
    pipe = tiny.flux_pipeline(shape)
    tok = clip_tokenizer()
    pipe.register_modules(tokenizer=tok, tokenizer_2=t5_tokenizer(), text_encoder_2=_t5_encoder(shape.joint_attention_dim),
                          text_encoder=_clip_encoder(CLIPTextModel, len(tok), shape.pooled_dim, shape.pooled_dim))
    pipe.save_pretrained(path)
    return path


def save_as(source: str, class_name: str, path: str) -> str:
    """The pipeline saved at ``source`` loaded as ``class_name`` (a sibling over the same components: SD3
    image-to-image or inpainting, Flux Kontext) and saved at ``path``."""
    import diffusers

    getattr(diffusers, class_name).from_pretrained(source).save_pretrained(path)
    return path


def _umt5_encoder(d_model: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(3)
    return UMT5EncoderModel(UMT5Config(vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                                       num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                       pad_token_id=0, eos_token_id=1)).eval()


def save_wan(path: str, **kwargs) -> str:
    """A tiny Wan pipeline (tiny.wan_pipeline's keywords: experts=2 for Wan 2.2's two experts, image_to_video,
    video_to_video) with a UMT5 text encoder (d_model = the transformer's text_dim) and the T5 tokenizer."""
    shape = tiny.WanShape(num_layers=2, image_dim=16 if kwargs.get("image_to_video") else None)
    pipe = tiny.wan_pipeline(shape, **kwargs)
    pipe.register_modules(tokenizer=t5_tokenizer(), text_encoder=_umt5_encoder(shape.text_dim))
    pipe.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def quiet_and_offline(monkeypatch):
    """The command's tests: no progress bars in the output, and the hub is never asked (everything is local)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
