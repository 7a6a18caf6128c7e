"""Tiny tokenizers built offline from a vocabulary written here (nothing is downloaded), for random-weight text
encoders: the command's tests save them into tiny pipelines, and the diffusers test-suite harness
(evaluation/diffusers_suite) stands them in for the hub's tiny test tokenizers."""

from __future__ import annotations

import string

# Qwen2's special tokens at their ids in the real vocabulary: a Qwen2.5-VL text encoder's config names some of them
# (image_token_id 151655, vision_start_token_id 151652, ...), so they keep their places here.
QWEN2_SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                 "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                 "<|image_pad|>": 151655, "<|video_pad|>": 151656}
# Qwen2's chat template without tools or thinking: each message between <|im_start|> and <|im_end|>.
QWEN2_CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
                       "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                       "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
                       "{% else %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% endif %}{% endfor %}"
                       "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def clip_tokenizer():
    """CLIP's byte-level BPE over single characters (each with and without the end-of-word mark) and no merges:
    every word is spelt out letter by letter, which is all a random-weight encoder needs."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def t5_tokenizer():
    """T5's unigram tokenizer over lowercase letters, digits and punctuation (anything else maps to <unk>)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def qwen2_tokenizer():
    """Qwen2's byte-level BPE over the 256 byte characters (ids 0-255) and no merges, with the chat and vision
    special tokens at their real ids (QWEN2_SPECIAL) and a plain chat template."""
    from tokenizers import pre_tokenizers
    from transformers import AddedToken, Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update(QWEN2_SPECIAL)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in QWEN2_SPECIAL
                                                          if t != "<|endoftext|>"]})
    tok.chat_template = QWEN2_CHAT_TEMPLATE
    return tok
