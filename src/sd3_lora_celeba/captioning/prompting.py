"""The Llama 3 prompt: plain sentences from the CelebA attributes, and the chat messages around them.

Pure functions of the example record; no model is needed to test them.

Which attributes become sentences:

* sex always: ``Male`` true gives "The person is a man.", false "The person is a woman.";
* a beard when ``No_Beard`` is *false* (the attribute is negative, so true gives no sentence);
* every other attribute only when true;
* the subjective attributes (:data:`SUBJECTIVE_ATTRIBUTES`: ``Attractive`` and ``Chubby``, judgements of a
  person rather than things one sees) only with ``--include-subjective``.
"""

from __future__ import annotations

from collections.abc import Mapping

from sd3_lora_celeba.layout import ATTRIBUTES

# Judgements about the person rather than visible facts: left out of the prompt unless asked for.
SUBJECTIVE_ATTRIBUTES = ("Attractive", "Chubby")

# One plain sentence per attribute, said when the attribute is true. Male and No_Beard are handled apart.
ATTRIBUTE_SENTENCES: dict[str, str] = {
    "5_o_Clock_Shadow": "The person has a five o'clock shadow.",
    "Arched_Eyebrows": "The person has arched eyebrows.",
    "Attractive": "The person is attractive.",
    "Bags_Under_Eyes": "The person has bags under the eyes.",
    "Bald": "The person is bald.",
    "Bangs": "The person has bangs.",
    "Big_Lips": "The person has big lips.",
    "Big_Nose": "The person has a big nose.",
    "Black_Hair": "The person has black hair.",
    "Blond_Hair": "The person has blond hair.",
    "Blurry": "The photo is blurry.",
    "Brown_Hair": "The person has brown hair.",
    "Bushy_Eyebrows": "The person has bushy eyebrows.",
    "Chubby": "The person is chubby.",
    "Double_Chin": "The person has a double chin.",
    "Eyeglasses": "The person wears eyeglasses.",
    "Goatee": "The person has a goatee.",
    "Gray_Hair": "The person has gray hair.",
    "Heavy_Makeup": "The person wears heavy makeup.",
    "High_Cheekbones": "The person has high cheekbones.",
    "Mouth_Slightly_Open": "The person's mouth is slightly open.",
    "Mustache": "The person has a mustache.",
    "Narrow_Eyes": "The person has narrow eyes.",
    "Oval_Face": "The person has an oval face.",
    "Pale_Skin": "The person has pale skin.",
    "Pointy_Nose": "The person has a pointy nose.",
    "Receding_Hairline": "The person has a receding hairline.",
    "Rosy_Cheeks": "The person has rosy cheeks.",
    "Sideburns": "The person has sideburns.",
    "Smiling": "The person is smiling.",
    "Straight_Hair": "The person has straight hair.",
    "Wavy_Hair": "The person has wavy hair.",
    "Wearing_Earrings": "The person wears earrings.",
    "Wearing_Hat": "The person wears a hat.",
    "Wearing_Lipstick": "The person wears lipstick.",
    "Wearing_Necklace": "The person wears a necklace.",
    "Wearing_Necktie": "The person wears a necktie.",
    "Young": "The person is young.",
}
MAN, WOMAN = "The person is a man.", "The person is a woman."
BEARD = "The person has a beard."

SYSTEM_PROMPT = (
    "You write captions for a dataset of face photos used to train a text-to-image model. "
    "Captions are short, objective and fit on one line."
)
USER_PROMPT = (
    'An automatic captioner described the photo as: "{caption}"\n'
    "Facts about the person in the photo:\n"
    "{facts}\n"
    "Write one short, objective, one-line description of the photo that combines the caption and the facts. "
    "Do not judge the person's looks. Reply with the description only."
)


def attribute_sentences(attributes: Mapping[str, bool], include_subjective: bool = False) -> list[str]:
    """Plain sentences for the true CelebA attributes of one example, in release order (sex first).

    ``attributes`` maps attribute names (:data:`layout.ATTRIBUTES`) to booleans; ``Male`` is required,
    missing others count as false.
    """
    if "Male" not in attributes:
        raise ValueError("attributes lack 'Male': the sex sentence is always given")
    sentences = [MAN if attributes["Male"] else WOMAN]
    for name in ATTRIBUTES:
        if name == "Male":
            continue
        if name == "No_Beard":
            if attributes.get(name, True) is False:
                sentences.append(BEARD)
            continue
        if name in SUBJECTIVE_ATTRIBUTES and not include_subjective:
            continue
        if attributes.get(name, False):
            sentences.append(ATTRIBUTE_SENTENCES[name])
    return sentences


def build_messages(blip2_caption: str, sentences: list[str]) -> list[dict[str, str]]:
    """Chat messages (system, user) asking for one description from a BLIP-2 caption and attribute facts."""
    facts = "\n".join(f"- {s}" for s in sentences)
    user = USER_PROMPT.format(caption=" ".join(blip2_caption.split()), facts=facts)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
