"""Summaries of model files: a GGUF file, a safetensors file or folder, or a lowbit output folder."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.eval.size import float_bits
from lowbit.model.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, read_header
from lowbit.model.load import validate_gguf


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Per-tensor rows (name, type, shape, elements, bytes, bpw) and totals for any supported file."""
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"{path} does not exist")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _inspect_gguf(path)
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        return _inspect_lowbit(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise LowbitError(f"{path}: expected a .gguf file, a .safetensors file, or a folder holding them")
    return _inspect_safetensors(path, files)


def _summary(kind: str, path: Path, rows: list[dict], extra: dict | None = None) -> dict[str, Any]:
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "elements": 0, "bytes": 0})
    for row in rows:
        agg = by_type[row["type"]]
        agg["tensors"] += 1
        agg["elements"] += row["elements"]
        agg["bytes"] += row["bytes"]
    elements = sum(r["elements"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    return {"kind": kind, "path": str(path), "file_bytes": _file_bytes(path), "tensors": rows,
            "by_type": dict(by_type), "elements": elements, "tensor_bytes": nbytes,
            "bits_per_weight": 8 * nbytes / elements if elements else 0.0, **(extra or {})}


def _file_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _inspect_gguf(path: Path) -> dict[str, Any]:
    reader = validate_gguf(path)  # bounded checks first, then gguf-py's reader
    rows = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape],
             "elements": int(t.n_elements), "bytes": int(t.n_bytes)} for t in reader.tensors]
    meta = {key: _gguf_value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return _summary("gguf", path, rows, {"metadata": meta, "metadata_keys": len(reader.fields)})


def _gguf_value(field) -> Any:
    """A metadata value short enough to print: arrays as their length, long strings cut."""
    import gguf

    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        n = len(field.data)
        return field.contents() if n <= 8 else f"[{n} items]"
    value = field.contents()
    return value[:77] + "..." if isinstance(value, str) and len(value) > 80 else value


def _inspect_safetensors(path: Path, files: list[Path]) -> dict[str, Any]:
    rows = []
    for file in files:
        header, _ = read_header(file)
        for name, info in header.items():
            a, b = info["data_offsets"]
            rows.append({"name": name, "type": info["dtype"], "shape": info["shape"],
                         "elements": math.prod(info["shape"]), "bytes": b - a})
    for row in rows:
        row["bits"] = float_bits(row["type"])
    return _summary("safetensors", path, rows)


def _inspect_lowbit(path: Path) -> dict[str, Any]:
    header, meta = read_header(path / WEIGHTS_FILE)
    quantized = meta.get("quantized", {})
    rows, owned = [], set()
    for name, entry in quantized.items():
        parts = [f"{name}.{p}" for p in ("qcodes", "scales", "qzeros", "global_scale") if f"{name}.{p}" in header]
        owned.update(parts)
        nbytes = sum(header[p]["data_offsets"][1] - header[p]["data_offsets"][0] for p in parts)
        rows.append({"name": name, "type": entry["spec"], "shape": entry["shape"],
                     "elements": math.prod(entry["shape"]), "bytes": nbytes})
    for name, info in header.items():
        if name not in owned:
            a, b = info["data_offsets"]
            rows.append({"name": name, "type": info["dtype"], "shape": info["shape"],
                         "elements": math.prod(info["shape"]), "bytes": b - a})
    return _summary("lowbit", path, rows, {"format_version": meta.get("format_version")})
