"""Importance matrices: llama.cpp's legacy ``imatrix.dat`` file format, read and written.

An importance matrix holds, per quantized GGUF tensor, the mean squared activation of each input column
over calibration tokens. File layout (little-endian, llama.cpp ``save_imatrix_legacy``): int32 entry count;
per entry int32 name length, name bytes, int32 ncall, int32 nval, float32[nval] holding mean*ncall; then
int32 chunk count and int32 length + bytes of the calibration data set's name.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError
from lowbit.io_utils import atomic_file


def write_imatrix(path: str | Path, imatrix: dict[str, np.ndarray], n_chunks: int, dataset: str,
                  force: bool = True) -> None:
    """Write ``imatrix`` (GGUF tensor name -> per-column mean square) as a llama.cpp imatrix.dat file."""
    ncall = max(int(n_chunks), 1)
    with atomic_file(path, force=force) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<i", len(imatrix)))
        for name, values in imatrix.items():
            raw = name.encode()
            vals = np.asarray(values, dtype="<f4") * np.float32(ncall)
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size))
            f.write(vals.tobytes())
        data = dataset.encode()
        f.write(struct.pack("<i", ncall) + struct.pack("<i", len(data)) + data)


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF tensor name -> per-column mean square, from a llama.cpp imatrix.dat file."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"imatrix file {path} does not exist")
    blob = path.read_bytes()
    try:
        (n,), pos, out = struct.unpack_from("<i", blob, 0), 4, {}
        if n <= 0 or n > 1_000_000:
            raise ValueError(f"bad entry count {n}")
        for _ in range(n):
            (length,) = struct.unpack_from("<i", blob, pos)
            name = blob[pos + 4:pos + 4 + length].decode()
            pos += 4 + length
            ncall, nval = struct.unpack_from("<ii", blob, pos)
            pos += 8
            vals = np.frombuffer(blob, dtype="<f4", count=nval, offset=pos).astype(np.float32)
            pos += 4 * nval
            out[name] = vals / np.float32(max(ncall, 1))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise LowbitError(f"{path} is not a llama.cpp imatrix file ({exc})") from None
    return out


def check_imatrix(imatrix: dict[str, np.ndarray], columns: dict[str, int], path: str | Path) -> None:
    """One-line error unless every quantized tensor has an entry of the right length (same model)."""
    missing = [name for name in columns if name not in imatrix]
    wrong = [name for name, n in columns.items() if name in imatrix and imatrix[name].size != n]
    if wrong or len(missing) == len(columns):
        example = (wrong or missing)[0]
        got = imatrix[example].size if example in imatrix else "no entry"
        raise LowbitError(f"imatrix {path} was made for another model: {example} needs {columns[example]} "
                          f"values, the file has {got}")
