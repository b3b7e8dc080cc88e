"""llama.cpp's own command-line tools (llama-imatrix, llama-quantize), built from the sources llama-cpp-python
vendors, for benchmarks that compare lowbit with llama.cpp given its own importance matrix.

llama-cpp-python's Python API cannot hand llama_model_quantize an importance matrix (it is a C++ map), so the
comparison runs the real tools. The source distribution of the installed llama-cpp-python version is fetched from
PyPI (the only network this machine has) and built with cmake once, CPU only, into ``~/.cache/lowbit``; later
calls reuse the binaries. About 8 minutes on 2 cores.

    .venv/bin/python bench/llamacpp_tools.py     # build (or find) the tools and print their folder
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = ("llama-imatrix", "llama-quantize")
CACHE = Path.home() / ".cache" / "lowbit"


def tools_dir() -> Path:
    """The folder holding llama-imatrix and llama-quantize for the installed llama-cpp-python, built if absent."""
    version = importlib.metadata.version("llama_cpp_python")
    bin_dir = CACHE / f"llama.cpp-tools-{version}"
    if all((bin_dir / tool).is_file() for tool in TOOLS):
        return bin_dir
    with tempfile.TemporaryDirectory(dir=CACHE.mkdir(parents=True, exist_ok=True) or CACHE) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                        "-d", tmp, f"llama-cpp-python=={version}"], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = source / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "-j2", "--target", *TOOLS], check=True,
                       stdout=subprocess.DEVNULL)
        staging = bin_dir.with_name(bin_dir.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        for tool in TOOLS:
            (build / "bin" / tool).replace(staging / tool)
        staging.replace(bin_dir)  # complete or absent: an interrupted build leaves no half-filled folder
    return bin_dir


if __name__ == "__main__":
    print(tools_dir())
