"""Small real model files and ways to break them, for the untrusted-file tests and bench/fuzz_readers.py.

``write_tiny_gguf`` writes a one-block Llama with a byte-level BPE tokenizer through gguf-py's GGUFWriter
(F32 norms, an F16 embedding, Q8_0/Q4_0 matrices), small enough that its header parses in milliseconds and real
enough that ``lowbit.model.load.load_model`` loads it. ``mutate`` applies mutations drawn by ``random_mutations``
from any ``random.Random`` (hypothesis' ``st.randoms()`` in the suite, a seeded one in the bench): bit flips and
byte writes in the header, edge-case integers written over the header's length, count, type, dimension and
offset fields, inserted or deleted bytes, truncation anywhere. ``gguf_file`` and its helpers assemble GGUF
bytes by hand, for files no writer would produce.
"""

from __future__ import annotations

import contextlib
import random
import signal
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HIDDEN, HEADS, KV_HEADS, FF = 64, 2, 1, 96
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["t h", "th e", "a n", "i n", "e r", "o n", "Ġ t", "Ġ a", "r e", "a t"]
# looks like the template-injection payloads seen in the wild: lowbit must copy it, never render it
HOSTILE_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                    "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ self.__init__.__globals__['os'].system('id') }}"
                    "{{ cycler.__init__.__globals__.os.popen('touch /tmp/pwned').read() }}\n\u00e9\u4e2d")


def tiny_tokens() -> list[str]:
    """The vocabulary: an end token, the letters, the byte-level space, then one token per merge."""
    return ["<eos>", *LETTERS, "Ġ", *[m.replace(" ", "") for m in MERGES]]


def _tensors(rng: np.random.Generator, n_vocab: int) -> list[tuple[str, np.ndarray, str]]:
    """(GGUF name, float32 [rows, cols] data, ggml type name) of every tensor."""
    def w(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols)).astype(np.float32) * 0.1

    kv = HIDDEN // HEADS * KV_HEADS
    return [("token_embd.weight", w(n_vocab, HIDDEN), "F16"),
            ("output_norm.weight", np.ones(HIDDEN, np.float32), "F32"), ("output.weight", w(n_vocab, HIDDEN), "Q8_0"),
            ("blk.0.attn_norm.weight", np.ones(HIDDEN, np.float32), "F32"),
            ("blk.0.attn_q.weight", w(HIDDEN, HIDDEN), "Q8_0"), ("blk.0.attn_k.weight", w(kv, HIDDEN), "Q8_0"),
            ("blk.0.attn_v.weight", w(kv, HIDDEN), "Q4_0"), ("blk.0.attn_output.weight", w(HIDDEN, HIDDEN), "Q8_0"),
            ("blk.0.ffn_norm.weight", np.ones(HIDDEN, np.float32), "F32"),
            ("blk.0.ffn_gate.weight", w(FF, HIDDEN), "Q8_0"), ("blk.0.ffn_up.weight", w(FF, HIDDEN), "Q4_0"),
            ("blk.0.ffn_down.weight", w(HIDDEN, FF), "Q8_0")]


def write_tiny_gguf(path: Path, chat_template: str = HOSTILE_TEMPLATE, seed: int = 0) -> Path:
    """A real GGUF file of a one-block Llama that lowbit loads, with ``chat_template`` in its metadata."""
    import gguf

    tokens = tiny_tokens()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)
    for name, data, type_name in _tensors(np.random.default_rng(seed), len(tokens)):
        add_tensor(writer, name, data, type_name)
    finish(writer)
    return path


def add_tensor(writer, name: str, data: np.ndarray, type_name: str) -> None:
    """Add float32 ``data`` to a GGUFWriter as F16, F32, or a type gguf-py quantizes (Q8_0, Q4_0, ...)."""
    import gguf

    if type_name in ("F16", "F32"):
        writer.add_tensor(name, data.astype(np.float16 if type_name == "F16" else np.float32))
        return
    qtype = gguf.GGMLQuantizationType[type_name]
    writer.add_tensor(name, gguf.quantize(data, qtype), raw_dtype=qtype)


def finish(writer) -> None:
    """Write a GGUFWriter's header, metadata and tensors, and close the file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_safetensors(path: Path, seed: int = 0) -> Path:
    """A real safetensors file: a few tensors of different dtypes and shapes (a scalar, an empty one) and
    ``__metadata__``, written by safetensors.numpy."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {"embed.weight": rng.standard_normal((16, 8)).astype(np.float32),
               "layer.0.weight": rng.standard_normal((8, 8)).astype(np.float16),
               "layer.0.bias": np.arange(8, dtype=np.int64), "scale": np.array(2.0, dtype=np.float64),
               "mask": np.array([True, False, True]), "empty": np.zeros((0, 4), dtype=np.int32)}
    save_file(tensors, str(path), metadata={"format": "pt", "note": "tiny"})
    return path


# ---- hand-made GGUF bytes (for the rules one at a time) --------------------------------------------------------

UINT32 = 4  # GGUFValueType.UINT32


def s(text: str | bytes) -> bytes:
    """A GGUF string: u64 length, then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """A metadata entry: key, u32 value type, the encoded value."""
    return s(key) + struct.pack("<I", vtype) + payload


def u32(key: str, value: int) -> bytes:
    return kv(key, UINT32, struct.pack("<I", value))


def info(name: str | bytes, dims: tuple[int, ...], qtype: int, offset: int) -> bytes:
    """A tensor-info entry: name, u32 dimension count, u64 dimensions, u32 ggml type, u64 offset."""
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def gguf_file(tmp_path: Path, kvs: list[bytes] = (), tensors: list[bytes] = (), data: bytes = b"", *,
              version: int = 3, n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32,
              name: str = "m.gguf") -> Path:
    """A GGUF file assembled from encoded metadata and tensor-info entries, padded, then ``data``."""
    body = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    if tensors:
        body += bytes(-len(body) % alignment)
    path = tmp_path / name
    path.write_bytes(body + data)
    return path


# ---- mutations -------------------------------------------------------------------------------------------------

EDGE_INTS = (0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 32, 33, 63, 64, 65, 255, 256, 4096, 2**16, 2**24, 2**31 - 1, 2**31,
             2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1)


@dataclass(frozen=True)
class Seed:
    """A file to mutate: its bytes, where its header ends, and (offset, width) of each integer field in it."""

    data: bytes
    header_end: int
    ints: tuple[tuple[int, int], ...]


def gguf_seed(path: Path) -> Seed:
    """A GGUF file as a Seed; its integer fields are found with gguf-py's reader (an honest file)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    parts = [p for f in reader.fields.values() for p in f.parts]
    parts += [p for t in reader.tensors for p in t.field.parts]
    ints = sorted({(p.ctypes.data - base, p.itemsize) for p in parts
                   if p.size == 1 and p.dtype.kind in "ui" and p.itemsize in (4, 8)})
    return Seed(path.read_bytes(), int(reader.data_offset), tuple(ints))


def safetensors_seed(path: Path) -> Seed:
    """A safetensors file as a Seed: the header length is its one integer field."""
    data = path.read_bytes()
    return Seed(data, 8 + int.from_bytes(data[:8], "little"), ((0, 8),))


def _draw_int(rng: random.Random, seed: Seed) -> tuple:
    offset, width = rng.choice(seed.ints)
    return offset, width, rng.choice(EDGE_INTS + (len(seed.data), seed.header_end, rng.getrandbits(8 * width)))


# how each kind of mutation draws its arguments; a kind listed twice is drawn twice as often
_DRAW = {
    "flip": lambda rng, seed: (rng.randrange(seed.header_end), rng.randrange(8)),
    "byte": lambda rng, seed: (rng.randrange(seed.header_end), rng.choice((0, 1, 0x7F, 0x80, 0xC0, 0xFF))),
    "int": _draw_int,
    "insert": lambda rng, seed: (rng.randrange(seed.header_end), rng.randbytes(rng.choice((1, 4, 8, 13)))),
    "delete": lambda rng, seed: (rng.randrange(seed.header_end), rng.choice((1, 4, 8, 13))),
    "truncate": lambda rng, seed: (rng.randrange(len(seed.data)),),
}
KINDS = ("flip", "flip", "byte", "int", "int", "int", "insert", "delete", "truncate")


def random_mutations(rng: random.Random, seed: Seed) -> list[tuple]:
    """One to four mutations, each a tuple ``(kind, *arguments)`` that ``mutate`` applies."""
    out = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        kind = rng.choice(KINDS)
        out.append((kind, *_DRAW[kind](rng, seed)))
    return out


def _flip(data: bytearray, position: int, bit: int) -> None:
    data[position % len(data)] ^= 1 << bit


def _byte(data: bytearray, position: int, value: int) -> None:
    data[position % len(data)] = value


def _int(data: bytearray, offset: int, width: int, value: int) -> None:
    data[offset:offset + width] = (value % (1 << 8 * width)).to_bytes(width, "little")


def _insert(data: bytearray, position: int, raw: bytes) -> None:
    data[position:position] = raw


def _delete(data: bytearray, position: int, n: int) -> None:
    del data[position:position + n]


def _truncate(data: bytearray, length: int) -> None:
    del data[length:]


_APPLY = {"flip": _flip, "byte": _byte, "int": _int, "insert": _insert, "delete": _delete, "truncate": _truncate}


def mutate(seed: Seed, mutations: list[tuple]) -> bytes:
    """The seed's bytes with the mutations applied in order (positions past a shortened file wrap around)."""
    data = bytearray(seed.data)
    for kind, *args in mutations:
        if not data:
            break
        _APPLY[kind](data, *args)
    return bytes(data)


def one_line(message: str) -> bool:
    """Whether an error message is one line."""
    return bool(message) and "\n" not in message and "\r" not in message


# ---- what lowbit does with a file from a user ----------------------------------------------------------------

class CaseTimeout(BaseException):
    """A case ran past its time limit (a hang, as far as the fuzz tests are concerned). A BaseException, so that
    code under test that catches Exception (to turn it into a one-line error) cannot swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout in the main thread if the block runs longer than ``seconds`` (Unix timers)."""
    def on_alarm(signum, frame):
        raise CaseTimeout(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def open_gguf_as_lowbit(path: Path) -> str:
    """Every way lowbit reads a GGUF file's header and metadata: the bounded checks, then gguf-py's reader with
    no safety net (after the checks it must not raise), every metadata value and tensor view, the tokenizer copy
    that GGUF export makes and ``lowbit inspect``'s summary. Returns "loaded"; a LowbitError, or anything else,
    propagates. (``load_model`` goes on to build the model from the metadata: ``load_gguf_model``.)"""
    import gguf

    from lowbit.gguf.tokenizer import copy_from_gguf
    from lowbit.inspect_files import inspect_path
    from lowbit.model.gguf_checks import check_gguf

    layout = check_gguf(path)
    reader = gguf.GGUFReader(str(path))
    for field in reader.fields.values():
        field.contents()
    for tensor, entry in zip(reader.tensors, layout.tensors, strict=True):
        if tensor.data.nbytes != entry.nbytes or tensor.data_offset != layout.data_start + entry.offset:
            raise AssertionError(f"gguf-py places {tensor.name} differently from the checks")
    del reader
    copy_from_gguf(path)
    inspect_path(path)
    return "loaded"


def load_gguf_model(path: Path) -> str:
    """``load_model`` on a GGUF file: config, tokenizer and model built by transformers from its metadata, every
    tensor dequantized into it. Returns "loaded"."""
    from lowbit.model.load import load_model

    load_model(str(path))
    return "loaded"


def open_safetensors_as_lowbit(path: Path) -> str:
    """Every way lowbit reads a safetensors file: the checks (through ``validate_safetensors``), then the
    safetensors library mapping each tensor into torch, and ``lowbit inspect``'s summary. Returns "loaded"."""
    from safetensors import safe_open

    from lowbit.inspect_files import inspect_path
    from lowbit.model.load import validate_safetensors

    validate_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            f.get_tensor(name)
    inspect_path(path)
    return "loaded"
