"""The project's one seed-derivation scheme: a 63-bit seed from a base seed and any keys.

``derive_seed(seed, *keys)`` hashes ``"seed:key1:key2..."`` with sha256 and keeps 63 bits, so it is stable across
Python runs, processes and machines, and nearby keys give unrelated seeds. Generation seeds each image's noise
with ``derive_seed(--seed, example_id)``; training derives the data order and each sample's randomness from
``(--seed, epoch, position)``.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *keys: int | str) -> int:
    """A seed in ``[0, 2**63)`` for ``torch.Generator.manual_seed``, from ``seed`` and ``keys``."""
    text = ":".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)
