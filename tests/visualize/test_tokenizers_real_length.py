"""The tiny tokenizers tokenize a real-length caption as the real ones do: words whole in CLIP, some split in T5."""

from sd3_lora_celeba.testing.tokenizers import (
    EXAMPLE_CAPTION,
    build_clip_tokenizer,
    build_t5_tokenizer,
    learn_bpe_merges,
)

CAPTION = EXAMPLE_CAPTION


def test_a_35_word_caption_is_about_40_clip_and_50_t5_tokens():
    assert len(CAPTION.split()) == 35
    clip = build_clip_tokenizer()(CAPTION).input_ids
    t5 = build_t5_tokenizer()(CAPTION).input_ids
    assert 38 <= len(clip) <= 46, len(clip)
    assert 45 <= len(t5) <= 56, len(t5)


def test_clip_keeps_caption_words_whole_and_t5_splits_long_ones():
    clip = build_clip_tokenizer()
    assert clip.tokenize("smiling woman with eyeglasses") == [
        "smiling</w>",
        "woman</w>",
        "with</w>",
        "eyeglasses</w>",
    ]
    t5 = build_t5_tokenizer()
    pieces = t5.tokenize("She has eyebrows")
    assert pieces[:2] == ["\u2581She", "\u2581has"]
    assert len(pieces) == 4 and "".join(pieces[2:]) == "\u2581eyebrows"


def test_bpe_merges_break_ties_by_the_pair():
    from collections import Counter

    # "ab" and "cd" tie in frequency: the smaller pair is merged first, whatever the dict order.
    counts = Counter({"ab": 3, "cd": 3})
    reordered = Counter({"cd": 3, "ab": 3})
    assert learn_bpe_merges(counts) == learn_bpe_merges(reordered)
    assert learn_bpe_merges(counts)[0] == ("a", "b</w>")
