"""Attribute sentences and chat messages of the Llama 3 prompt."""

from __future__ import annotations

import pytest

from sd3_lora_celeba.captioning.prompting import (
    ATTRIBUTE_SENTENCES,
    BEARD,
    MAN,
    SUBJECTIVE_ATTRIBUTES,
    WOMAN,
    attribute_sentences,
    build_messages,
)
from sd3_lora_celeba.layout import ATTRIBUTES


def _attributes(**true: bool) -> dict[str, bool]:
    attributes = {name: False for name in ATTRIBUTES}
    attributes["No_Beard"] = True  # the CelebA default: no beard
    attributes.update(true)
    return attributes


def test_every_attribute_but_sex_and_beard_has_a_sentence():
    assert set(ATTRIBUTE_SENTENCES) == set(ATTRIBUTES) - {"Male", "No_Beard"}
    assert all(s.endswith(".") and s[0].isupper() for s in ATTRIBUTE_SENTENCES.values())


@pytest.mark.parametrize(("male", "expected"), [(True, MAN), (False, WOMAN)])
def test_sex_is_always_said_first(male, expected):
    assert attribute_sentences(_attributes(Male=male)) == [expected]
    assert attribute_sentences(_attributes(Male=male, Smiling=True))[0] == expected


def test_beard_only_when_no_beard_is_false():
    assert BEARD in attribute_sentences(_attributes(Male=True, No_Beard=False))
    assert BEARD not in attribute_sentences(_attributes(Male=True, No_Beard=True))
    # A record without No_Beard says nothing about a beard.
    assert attribute_sentences({"Male": True}) == [MAN]


def test_true_attributes_in_release_order():
    sentences = attribute_sentences(
        _attributes(Male=False, Wearing_Lipstick=True, Bangs=True, Blond_Hair=True)
    )
    assert sentences == [
        WOMAN,
        "The person has bangs.",
        "The person has blond hair.",
        "The person wears lipstick.",
    ]


def test_subjective_attributes_only_when_asked():
    attributes = _attributes(Male=True, Attractive=True, Chubby=True, Smiling=True)
    default = attribute_sentences(attributes)
    assert "Attractive" in SUBJECTIVE_ATTRIBUTES
    assert "The person is attractive." not in default and "The person is chubby." not in default
    assert "The person is smiling." in default
    with_subjective = attribute_sentences(attributes, include_subjective=True)
    assert "The person is attractive." in with_subjective and "The person is chubby." in with_subjective


def test_missing_sex_is_an_error():
    with pytest.raises(ValueError, match="Male"):
        attribute_sentences({"Smiling": True})


def test_messages_hold_caption_and_facts():
    messages = build_messages("a woman  with\nlong hair", [WOMAN, "The person is smiling."])
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert '"a woman with long hair"' in user  # whitespace of the caption normalised
    assert "- The person is a woman.\n- The person is smiling." in user
    assert "one short, objective, one-line description" in user
