"""A readable dump of a GGUF / PowerInfer / GPU index file: header, keys with their types, tensor table."""
from __future__ import annotations

from powerinfer_py.formats.gguf import GGUFFile

MAX_ITEMS = 5  # array values show their first few items
MAX_CHARS = 80


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 3] + "..."


def describe(f: GGUFFile) -> str:
    lines = [f"file:      {f.path}",
             f"magic:     {f.magic.decode()}  version {f.version}  alignment {f.alignment}",
             f"keys:      {len(f.metadata)}",
             f"tensors:   {len(f.tensors)}  (data from byte {f.data_offset})", ""]
    width = max((len(k) for k in f.metadata), default=0)
    for key, value in f.metadata.items():
        vtype, elem = f.value_types[key]
        if elem is not None:
            shown = f"[{len(value)} x {elem.name}] " + ", ".join(_short(v) for v in value[:MAX_ITEMS])
            shown += ", ..." if len(value) > MAX_ITEMS else ""
        else:
            shown = _short(value)
        lines.append(f"{key:<{width}}  {vtype.name:<7}  {shown}")
    lines.append("")
    width = max((len(n) for n in f.tensors), default=4)
    lines.append(f"{'name':<{width}}  {'shape (torch order)':<20}  {'type':<8}  {'id':>3}  {'offset':>12}  {'bytes':>12}")
    for t in f.tensors.values():
        lines.append(f"{t.name:<{width}}  {str(t.shape):<20}  {t.ggml_type.name:<8}  {t.type_id:>3}  "
                     f"{t.offset:>12}  {t.nbytes:>12}")
    return "\n".join(lines)
