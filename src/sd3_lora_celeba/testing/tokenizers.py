"""Tokenizers built offline, in memory: CLIP-style byte-level BPE and T5-style Unigram.

They are learned deterministically in a fraction of a second on a small English corpus of face descriptions, so common words
become single tokens (useful for the per-token attention views), and are saved in the standard transformers
format so the real loading code (``AutoTokenizer.from_pretrained``) reads them.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

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


def _word_counts() -> Counter[str]:
    return Counter(word for sentence in corpus() for word in sentence.split())


def learn_bpe_merges(word_counts: Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned greedily; ties broken by the pair itself, so the result never varies.

    (The ``tokenizers`` trainers break ties by hash-map order, which changes from one process to the next and
    would make the tiny world's token ids, and so every cached embedding, differ between sessions.)
    """
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in word_counts.items() if w}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def build_clip_tokenizer(num_merges: int = 400, pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` with a byte-level BPE vocabulary learned on :func:`corpus`, max length 77."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in alphabet + [ch + "</w>" for ch in alphabet]:
        vocab[token] = len(vocab)
    merges = learn_bpe_merges(_word_counts(), num_merges)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    # SD3's second CLIP tokenizer pads with "!", an ordinary byte token, so only bos/eos are special.
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.model_max_length = 77
    return tok


def build_t5_tokenizer(extra_ids: int = 8):
    """A ``T5Tokenizer`` (fast, Unigram) whose pieces are the corpus words and single characters.

    Scores are log frequencies, so whole words win over spellings; ``<pad>``=0, ``</s>``=1, ``<unk>``=2.
    """
    from transformers import T5Tokenizer

    counts = _word_counts()
    total = sum(counts.values())
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -8.0)]
    vocab += [("\u2581" + w, math.log(n / total)) for w, n in sorted(counts.items())]
    vocab += [(ch, -12.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?"]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    tok = T5Tokenizer(vocab=vocab, extra_ids=extra_ids)
    tok.model_max_length = 512
    return tok


def vocab_size(tokenizer) -> int:
    """Embedding rows a model needs for ``tokenizer`` (largest id + 1)."""
    return max(itertools.chain(tokenizer.get_vocab().values(), [len(tokenizer) - 1])) + 1
