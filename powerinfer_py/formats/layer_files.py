"""PowerInfer's per-layer file sets (activation_{i}.pt, model_{i}.pt): find them in numeric layer order."""
from __future__ import annotations

import os
import re

from ..errors import InputError


def layer_files(folder: str, pattern: str, what: str, n_layers: int | None = None) -> list[str]:
    """Paths of the files named like `pattern` (one '{i}'), in numeric order, checked to be exactly layers
    0..n_layers-1 (PowerInfer's exporter sorts names as strings, so layer 2 would get layer 10's file)."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: {what} folder not found")
    regex = re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")
    found = {int(m.group(1)): name for name in os.listdir(folder) if (m := regex.match(name))}
    if not found:
        raise InputError(f"{folder}: no {pattern.replace('{i}', '<i>')} {what} files")
    expected = set(range(n_layers if n_layers is not None else max(found) + 1))
    missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
    if missing or extra:
        raise InputError(f"{folder}: {what} files do not match the model's {len(expected)} layers"
                         + (f"; missing layers {missing}" if missing else "")
                         + (f"; extra layers {extra}" if extra else ""))
    return [os.path.join(folder, found[i]) for i in sorted(found)]
