"""Attribute frequencies per split: the table ``prepare-celeba-hq`` prints to show the split is balanced."""

from __future__ import annotations

import numpy as np
from rich.table import Table

from sd3_lora_celeba.layout import ATTRIBUTES


def attribute_frequencies(values_by_split: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Percentage of positive examples of each attribute, per split (``values``: (N, 40) bool)."""
    return {
        split: [float(v) for v in (values.mean(axis=0) * 100 if len(values) else np.zeros(len(ATTRIBUTES)))]
        for split, values in values_by_split.items()
    }


def frequency_table(values_by_split: dict[str, np.ndarray]) -> Table:
    """A rich table: one row per attribute, one column per split, cells in percent of the split's examples."""
    freqs = attribute_frequencies(values_by_split)
    table = Table(title="Attribute frequencies per split (% of examples)")
    table.add_column("attribute")
    for split, values in values_by_split.items():
        table.add_column(f"{split} (n={len(values)})", justify="right")
    for i, name in enumerate(ATTRIBUTES):
        table.add_row(name, *(f"{freqs[split][i]:.1f}%" for split in values_by_split))
    return table


def frequency_lines(values_by_split: dict[str, np.ndarray]) -> list[str]:
    """The same table as plain text lines, for log files."""
    freqs = attribute_frequencies(values_by_split)
    header = f"{'attribute':<20}" + "".join(f"{s:>10}" for s in values_by_split)
    rows = [
        f"{name:<20}" + "".join(f"{freqs[s][i]:>9.1f}%" for s in values_by_split)
        for i, name in enumerate(ATTRIBUTES)
    ]
    return [header, *rows]
