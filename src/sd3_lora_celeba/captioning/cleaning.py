"""Post-processing of generated captions: one clean line, and a check for degenerate output.

Pure string functions, shared by the BLIP-2 and Llama 3 stages.
"""

from __future__ import annotations

import re

# Lines that introduce the answer instead of being it: "Here is a short description:", "Sure! ...".
_PREAMBLE_RE = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|here(?:'s| is| are)|below is|the following)\b.*$", re.IGNORECASE
)
# "Here is the description: A man ..." on a single line: keep what follows the colon.
_INLINE_PREAMBLE_RE = re.compile(
    r"^(?:(?:sure|certainly|of course|okay|ok)[!,.]?\s*)?(?:here(?:'s| is| are)|below is)\b[^:\n]*:\s*(?P<rest>.+)$",
    re.IGNORECASE,
)
_LABEL_RE = re.compile(r"^(?:description|caption|answer|output)\s*:\s*", re.IGNORECASE)
_LIST_MARK_RE = re.compile(r"^(?:[-*•]\s+|\d+[.)]\s+|#+\s*)")
_QUOTES = "\"'“”‘’`«»"


def _strip_markup(line: str) -> str:
    line = _LIST_MARK_RE.sub("", line.strip())
    line = line.replace("**", "").replace("__", "")
    return line.strip()


def _strip_quotes(line: str) -> str:
    # Remove matching surrounding quotes, possibly nested ("'A man.'"); keep inner apostrophes.
    while len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    if line.count('"') == 1:  # a lone quote left over from a cut-off answer
        line = line.replace('"', "")
    return line.strip()


def clean_caption(text: str) -> str:
    """The first real line of a model's answer, without preamble, labels, markdown or quotes.

    Returns ``""`` when nothing is left (the caller then writes no caption so that a re-run retries).
    """
    # Control characters (a random or broken model may emit them) become spaces.
    text = "".join(ch if ch.isprintable() or ch == "\n" else " " for ch in text.replace("\r\n", "\n"))
    for raw in text.split("\n"):
        line = _strip_markup(raw)
        if not line:
            continue
        inline = _INLINE_PREAMBLE_RE.match(line)
        if inline:
            line = inline.group("rest")
        elif _PREAMBLE_RE.match(line) and line.rstrip().endswith(":"):
            continue
        line = _strip_quotes(_strip_markup(_LABEL_RE.sub("", line)))
        line = " ".join(line.split())
        if line:
            return line
    return ""


def degenerate_reason(caption: str, max_words: int = 40) -> str | None:
    """Why a caption looks degenerate, or None when it looks fine.

    Degenerate means longer than ``max_words`` words, a word or word pair repeated three times in a row
    ("a man a man a man"), or any phrase of three or more words said twice: the usual failure modes of
    greedy decoding, which would teach the fine-tuned model nothing useful.
    """
    words = re.findall(r"[\w']+", caption.lower())
    if len(words) > max_words:
        return f"longer than {max_words} words ({len(words)})"
    for n in (1, 2):
        for start in range(len(words) - 3 * n + 1):
            gram = words[start : start + n]
            if words[start + n : start + 2 * n] == gram and words[start + 2 * n : start + 3 * n] == gram:
                return f"repeats '{' '.join(gram)}'"
    seen: set[tuple[str, ...]] = set()
    for start in range(len(words) - 2):
        gram = tuple(words[start : start + 3])
        if gram in seen:
            return f"repeats '{' '.join(gram)}'"
        seen.add(gram)
    return None
