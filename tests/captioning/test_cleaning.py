"""Cleaning model answers into one caption line, and spotting degenerate captions."""

from __future__ import annotations

import pytest

from sd3_lora_celeba.captioning.cleaning import clean_caption, degenerate_reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A smiling woman with long blond hair.", "A smiling woman with long blond hair."),
        (
            "Here is a short, objective, one-line description of the photo:\n\n"
            '"A smiling woman with wavy brown hair and red lipstick."',
            "A smiling woman with wavy brown hair and red lipstick.",
        ),
        (
            "Sure! Here's the description: A bald man with a goatee wearing a black hat.",
            "A bald man with a goatee wearing a black hat.",
        ),
        (
            "Here is the caption:\n**A young man with bangs and glasses.**\n\nI hope this helps!",
            "A young man with bangs and glasses.",
        ),
        ("  'A woman wearing earrings and a necklace.'  ", "A woman wearing earrings and a necklace."),
        ("“A man with a mustache, smiling.”", "A man with a mustache, smiling."),
        ("Description: A woman's face with rosy cheeks.", "A woman's face with rosy cheeks."),
        ("- A gray-haired man in a necktie.\n- Another line", "A gray-haired man in a necktie."),
        (
            "\"A man with sideburns and a five o'clock shadow",
            "A man with sideburns and a five o'clock shadow",
        ),
        ("A woman\twith   straight\r\nblack hair", "A woman with straight"),
        ("A man\x18with\x00a beard", "A man with a beard"),
        ("Here is a description:\n\n", ""),
        ("   \n\n  ", ""),
    ],
)
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


def test_clean_caption_keeps_a_caption_that_starts_like_a_preamble_word():
    # "Okay" or "Here" inside a real caption without a colon is content, not a preamble.
    assert clean_caption("Here a woman smiles at the camera.") == "Here a woman smiles at the camera."


@pytest.mark.parametrize(
    "caption",
    [
        "a woman with long blond hair smiling at the camera",
        "a man with a beard and a hat",
        "a close up of a person with glasses",
    ],
)
def test_normal_captions_are_not_degenerate(caption):
    assert degenerate_reason(caption) is None


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        ("a man a man a man", "repeats 'a man'"),
        ("a woman with hair hair hair", "repeats 'hair'"),
        ("a woman with long hair and a woman with long hair", "repeats 'a woman with'"),
        (" ".join(["word"] * 2 + [f"w{i}" for i in range(45)]), "longer than 40 words (47)"),
    ],
)
def test_degenerate_captions(caption, reason):
    assert degenerate_reason(caption) == reason


def test_degenerate_length_limit_is_a_parameter():
    caption = "a smiling young woman with long wavy blond hair"
    assert degenerate_reason(caption, max_words=9) is None
    assert degenerate_reason(caption, max_words=8) == "longer than 8 words (9)"
