"""Tokenizers built offline, in memory: CLIP-style byte-level BPE and T5-style Unigram.

They are trained in a fraction of a second on a small English corpus of face descriptions, so common words
become single tokens (useful for the per-token attention views), and are saved in the standard transformers
format so the real loading code (``AutoTokenizer.from_pretrained``) reads them.
"""

from __future__ import annotations

import itertools
import json

# Words that captions of faces use; enough for BPE to learn whole-word tokens for them.
FACE_WORDS = (
    "a photo of man woman person young old smiling smile face with hair black brown blond gray blonde "
    "wavy straight bangs eyeglasses glasses wearing hat earrings necklace necktie lipstick makeup beard "
    "mustache goatee sideburns bald receding hairline big nose lips pointy eyebrows arched bushy narrow eyes "
    "mouth slightly open high cheekbones rosy cheeks pale skin oval chubby double chin shadow bags under "
    "the and is in an on at of his her he she their they close up portrait looking camera background white "
    "red blue green dark light short long curly pink shirt suit jacket dress standing sitting smiling "
    "celebrity actor actress stage event front wall room outdoors blurry picture image headshot"
).split()


def corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences over FACE_WORDS (no randomness source outside the seed)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(FACE_WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n_sentences)]


def build_clip_tokenizer(vocab_size: int = 600, pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` with a BPE vocabulary learned on :func:`corpus`, max length 77."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    seed_tok = CLIPTokenizer()
    # SD3's second CLIP tokenizer pads with "!", an ordinary byte token, so only bos/eos are special.
    specials = [bos, eos]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend = seed_tok.backend_tokenizer
    backend.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    # Every single byte as a word end too, so no word ever falls back to the unknown token.
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.model_max_length = 77
    return tok


def build_t5_tokenizer(vocab_size: int = 400, extra_ids: int = 8):
    """A ``T5Tokenizer`` (fast, Unigram) learned on :func:`corpus`; ``<pad>``=0, ``</s>``=1, ``<unk>``=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer=trainer)
    pieces = [(p, float(s)) for p, s in json.loads(backend.to_str())["model"]["vocab"]]
    specials = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    body = [(p, s) for p, s in pieces if p not in specials]
    vocab = [(k, v) for k, v in specials.items()] + body
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    tok = T5Tokenizer(vocab=vocab, extra_ids=extra_ids)
    tok.model_max_length = 512
    return tok


def vocab_size(tokenizer) -> int:
    """Embedding rows a model needs for ``tokenizer`` (largest id + 1)."""
    return max(itertools.chain(tokenizer.get_vocab().values(), [len(tokenizer) - 1])) + 1
