"""Tokenizers built offline, in memory: CLIP-style byte-level BPE and T5-style Unigram.

Both are built from a fixed list of common English caption words (:data:`CAPTION_WORDS`), ordered roughly by how
often face captions use them, so a real-length caption tokenizes the way the real tokenizers do: CLIP's BPE keeps
common words whole (a 35-word caption is about 40 CLIP tokens with punctuation, start and end), T5's Unigram splits
longer words into two pieces (about 50 T5 tokens). That is what the per-word attention views need to be tested
with: words made of one token and words made of several.

Everything is learned deterministically in a fraction of a second, with no randomness and no hash-order
dependence, so token ids (and every cached embedding of the tiny world) are the same in every process. Both are
saved in the standard transformers format so the real loading code (``AutoTokenizer.from_pretrained``) reads them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, defaultdict

from sd3_lora_celeba.models.loading import CLIP_MAX_LENGTH

# Common words of face captions (BLIP-2 and Llama 3 style), roughly most frequent first.
CAPTION_WORDS = tuple(
    """
a the of and with in is her his to on at an she he it this that are has its as for by or from be their they
photo image picture portrait person man woman face hair eyes smiling smile looking camera wearing young old
black brown blond blonde gray grey white red blue green dark light short long curly wavy straight bangs
close up background slightly open mouth lips nose eyebrows cheeks chin skin beard mustache goatee sideburns
bald receding hairline big small pointy arched bushy narrow high cheekbones rosy pale oval chubby double
shadow bags under eyeglasses glasses hat earrings necklace necktie tie lipstick makeup shirt suit jacket dress
collar top sweater coat scarf headband ribbon bow flower flowers jewelry earring pearl gold silver chain
appears seems looks shows features stands sits holds has have having is was were been being does do did
expression gentle warm soft bright neutral serious calm friendly happy sad confident thoughtful pleasant
subtle broad wide faint slight natural direct directly forward side left right front behind above below
over near against toward towards into onto off out away around between through across along
head neck shoulders shoulder forehead ear ears eye eyelashes lashes brow brows teeth tooth cheek jaw jawline
mole freckles wrinkles dimples stubble facial complexion tan tanned fair olive light-skinned tone
styled parted pulled back tied bun ponytail braid braids loose shoulder-length layered cropped spiky
shaved thinning messy neat sleek voluminous thick thin fine fringe side-swept swept parting highlights
color colored colour dyed auburn chestnut platinum silver-gray salt pepper strawberry honey golden ash
lighting lit shot taken photograph studio outdoor outdoors indoor indoors setting scene event stage
red-carpet carpet premiere party street city building wall window door room crowd people audience
blurry blurred plain simple solid gradient backdrop bokeh sunny day night evening sunlight shade shadows
professional casual formal elegant stylish fashionable classic vintage modern black-and-white monochrome
celebrity actor actress singer model musician athlete politician presenter host figure public
middle-aged elderly teenage teenager girl boy lady gentleman adult child youthful older younger aged
around about approximately roughly likely possibly perhaps probably apparently clearly visible
framed centered cropped composition angle view profile three-quarter frontal upper body torso chest
wears wearing dressed clad sporting adorned featuring framing surrounding covering showing revealing
lipstick-red glossy matte painted nails hand hands finger fingers arm arms holding raised resting
microphone phone glass cup drink sign banner logo text words letters
v-neck neckline low-cut sleeveless strapless button-up buttoned striped patterned floral printed lace
denim leather silk cotton wool velvet satin sheer fabric material
beige cream tan navy maroon burgundy purple violet pink orange yellow teal turquoise khaki
one two three first second single pair few several many some all both each other another
very quite rather somewhat fairly extremely really too also just only still even more most less least
not no yes there here where when while which who whom whose what how why
can could may might will would should must shall
  """.split()
)

# 35 words in the style of a Llama 3 caption of a CelebA face: about 42 CLIP and 50 T5 tokens here, as with the
# real tokenizers. The attention-app tests use it as a real-length prompt.
EXAMPLE_CAPTION = (
    "The image shows a young woman with long, wavy brown hair and arched eyebrows. She is smiling slightly, "
    "wearing earrings and red lipstick, looking directly at the camera against a plain, softly blurred background "
    "outdoors."
)

# T5 pieces: words this long or longer are split into a stem and a continuation, as T5 does with rarer words.
T5_SPLIT_LENGTH = 8


def word_counts() -> Counter[str]:
    """Pseudo-frequencies of :data:`CAPTION_WORDS` (and of their parts around hyphens), highest first.

    Counts fall with the position in the list, so the learned merges favour the most common words; no
    randomness is involved.
    """
    counts: Counter[str] = Counter()
    n = len(CAPTION_WORDS)
    for rank, word in enumerate(CAPTION_WORDS):
        for part in word.split("-"):
            if part:
                counts[part] += n - rank
        counts["-"] += 1
    return counts


def learn_bpe_merges(counts: Counter[str], num_merges: int | None = None) -> list[tuple[str, str]]:
    """Byte-pair merges learned greedily; ties broken by the pair itself, so the result never varies.

    ``num_merges=None`` merges until every word is one symbol. (The ``tokenizers`` trainers break ties by
    hash-map order, which changes from one process to the next and would make the tiny world's token ids, and
    so every cached embedding, differ between sessions.) Pair counts are kept up to date incrementally and the
    best pair is taken from a heap of ``(-count, pair)``, so thousands of merges take well under a second.
    """
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(counts) if w]
    freq = [counts[w] for w in sorted(counts) if w]
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:], strict=False):
            pair_counts[pair] += freq[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and (num_merges is None or len(merges) < num_merges):
        negative, best = heapq.heappop(heap)
        if pair_counts.get(best, 0) != -negative or negative == 0:
            continue  # stale heap entry
        merges.append(best)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(best, ())):
            symbols = words[i]
            for pair in zip(symbols, symbols[1:], strict=False):
                pair_counts[pair] -= freq[i]
                touched.add(pair)
            out: list[str] = []
            j = 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:], strict=False):
                pair_counts[pair] += freq[i]
                where[pair].add(i)
                touched.add(pair)
        for pair in sorted(touched):
            if pair_counts.get(pair, 0) > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                pair_counts.pop(pair, None)
        pair_counts.pop(best, None)
    return merges


def build_clip_tokenizer(num_merges: int | None = None, pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` with a byte-level BPE vocabulary that keeps every caption word whole, max length 77."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in alphabet + [ch + "</w>" for ch in alphabet]:
        vocab[token] = len(vocab)
    merges = learn_bpe_merges(word_counts(), num_merges)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    # SD3's second CLIP tokenizer pads with "!", an ordinary byte token, so only bos/eos are special.
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.model_max_length = CLIP_MAX_LENGTH
    return tok


def _t5_pieces() -> list[tuple[str, float]]:
    """Word pieces with log-frequency scores: short words whole (also capitalised), long ones as stem + rest."""
    counts = word_counts()
    total = sum(counts.values())
    scores: dict[str, float] = {}

    def add(piece: str, score: float) -> None:
        scores[piece] = max(score, scores.get(piece, -math.inf))

    for word, n in sorted(counts.items()):
        if not word.isalpha():
            continue
        score = math.log(n / total)
        variants = (word, word.capitalize())
        for k, variant in enumerate(variants):
            if len(word) < T5_SPLIT_LENGTH:
                add("\u2581" + variant, score - 2.0 * k)
            else:
                half = len(word) // 2
                add("\u2581" + variant[:half], score - 2.0 * k)
                add(variant[half:], score)
    return sorted(scores.items())


def build_t5_tokenizer(extra_ids: int = 8):
    """A ``T5Tokenizer`` (fast, Unigram) whose pieces are caption words, word halves and single characters.

    Scores are log frequencies, so whole words win over spellings; ``<pad>``=0, ``</s>``=1, ``<unk>``=2.
    """
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -8.0)]
    vocab += _t5_pieces()
    known = {piece for piece, _ in vocab}
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'\"-!?()"
    vocab += [(ch, -12.0) for ch in chars if ch not in known]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    tok = T5Tokenizer(vocab=vocab, extra_ids=extra_ids)
    tok.model_max_length = 512
    return tok


def vocab_size(tokenizer) -> int:
    """Embedding rows a model needs for ``tokenizer`` (largest id + 1)."""
    return max(itertools.chain(tokenizer.get_vocab().values(), [len(tokenizer) - 1])) + 1
