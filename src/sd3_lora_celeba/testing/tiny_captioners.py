"""Tiny, randomly initialised BLIP-2 and Llama 3 captioners, built offline and saved like hub checkpoints.

They are the stand-ins for ``Salesforce/blip2-flan-t5-xl-coco`` and ``meta-llama/Llama-3.1-8B-Instruct`` in
the tests, the benchmark and ``sd3 demo``: same classes, same files (``config.json``, safetensors weights,
tokenizer, processor / chat template), so the captioning code loads them through the ordinary
``from_pretrained`` path. Their captions are random words; what matters is that every code path runs.

Tokenizers are trained in memory on a small corpus of face-caption words with the ``tokenizers`` library,
so nothing is downloaded. The same seed always gives the same weights and tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A small English corpus of face-caption words: enough for the tokenizers to learn whole words.
CAPTION_CORPUS = (
    "a close up of a woman with long blond hair smiling at the camera",
    "a man with a beard and a mustache wearing a black hat",
    "a young woman with brown wavy hair and red lipstick",
    "an older man with gray hair and glasses in a suit and tie",
    "a smiling person with bangs and earrings looking to the side",
    "a portrait of a bald man with a goatee and rosy cheeks",
    "the person is a man. the person is a woman. the person has a beard.",
    "the person is wearing eyeglasses, a necklace, a necktie, a hat or lipstick.",
    "the person has black hair, blond hair, brown hair, gray hair, straight hair or wavy hair.",
    "the person has arched eyebrows, bushy eyebrows, big lips, a big nose, a pointy nose or narrow eyes.",
    "the person has high cheekbones, an oval face, pale skin, sideburns, a double chin or a receding hairline.",
    "the person's mouth is slightly open. the photo is blurry. the person is young and attractive.",
    "here is a short, objective, one-line description of the photo: a caption of a face.",
    "write one short objective description. reply with the description only.",
)

# Special tokens of the Llama 3 chat format.
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

# A Llama-3-style chat template: header tokens around the role, <|eot_id|> after every turn.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def _corpus(repeats: int = 4) -> list[str]:
    return list(CAPTION_CORPUS) * repeats


def _never_generate(lm_head: torch.nn.Linear, token_ids: list[int]) -> None:
    """Zero the output rows of ``token_ids``: their logit is 0 while some of the ~200 random others are positive.

    A random model would otherwise often start with padding or end-of-sequence and caption nothing; the tiny
    captioners instead always write ``max_new_tokens`` tokens of (random) words.
    """
    with torch.no_grad():
        lm_head.weight[sorted(set(token_ids))] = 0.0


def build_tiny_t5_tokenizer(vocab_size: int = 200):
    """A flan-t5-style ``T5Tokenizer`` (Unigram, ``<pad>``=0, ``</s>``=1, ``<unk>``=2) trained in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    special = ["<pad>", "</s>", "<unk>"]
    trainer_tok = Tokenizer(models.Unigram())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>")
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    vocab = json.loads(trainer_tok.to_str())["model"]["vocab"]  # [[piece, log-prob], ...], specials first
    scores = [(piece, float(score)) for piece, score in vocab]
    if [p for p, _ in scores[:3]] != special:  # T5 relies on these ids
        raise RuntimeError(f"unexpected special token order {scores[:3]}")
    return T5Tokenizer(vocab=scores, extra_ids=0)


def build_tiny_blip2(path: Path | str, seed: int = 0) -> Path:
    """Save a tiny ``Blip2ForConditionalGeneration`` (ViT + Q-Former + flan-T5) and its processor to ``path``."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        T5Config,
    )

    path = Path(path)
    num_query_tokens = 4
    tokenizer = build_tiny_t5_tokenizer()
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    # transformers 5.x: the processor adds an "<image>" token to the tokenizer and prepends num_query_tokens of
    # them to the text, and the model scatters the Q-Former outputs into those positions.
    processor = Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens
    )
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)

    vision_config = Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    qformer_config = Blip2QFormerConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    text_config = T5Config(
        vocab_size=len(processor.tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=37,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        feed_forward_proj="gated-gelu",  # flan-t5 (T5 v1.1) style
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    config = Blip2Config(
        vision_config=vision_config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    tok = processor.tokenizer
    _never_generate(model.language_model.lm_head, [*tok.all_special_ids, tok.convert_tokens_to_ids("▁")])
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_llama3_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with the Llama 3 special tokens and chat template, trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        # Llama 3 has no pad token; like most users we pad with end-of-text (never generated mid-caption).
        pad_token="<|end_of_text|>",
    )
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama3(path: Path | str, seed: int = 0) -> Path:
    """Save a tiny ``LlamaForCausalLM`` chat model and its tokenizer (with chat template) to ``path``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tiny_llama3_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    _never_generate(model.lm_head, tokenizer.convert_tokens_to_ids(list(LLAMA3_SPECIAL_TOKENS)))
    # Like the Instruct checkpoints: stop at <|eot_id|> or <|end_of_text|>.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
