"""``lowbit quantize --resume`` end to end on tiny 3-block models: a run killed after any block (by an exception
standing for ``kill -9``, and by a real SIGKILL of a subprocess) and resumed writes the same bytes as an
uninterrupted run; two runs write the same bytes; a state from other inputs or a damaged one is a one-line
error and nothing is written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.hardware import cpu_has_bf16
from lowbit.pipeline.resume import state_folder
from tests.arch_models import save_tiny
from tests.kill_points import Killed, die_after_block

CALIB = ["--calib-samples", "6", "--calib-length", "64", "--calib-batch", "4", "--no-eval", "--json", "--force"]
METHODS = {"gptq": ["--method", "gptq"], "awq": ["--method", "awq"], "stream": ["--method", "gptq", "--stream"]}
OTHER_DTYPE = "fp32" if cpu_has_bf16() else "bf16"  # not what --calib-dtype auto gives here
REPORT = "report.json"
TEXT = "calib.txt"  # timings and peak memory: the one file that differs between identical runs




@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny 3-block models, with a short calibration text beside them (tokenizing the default text would take
    most of a run)."""
    from lowbit.data.text import default_text

    root = tmp_path_factory.mktemp("resume-models")
    (root / TEXT).write_text(default_text()[:20_000])
    return {family: save_tiny(family, root / family, num_hidden_layers=3) for family in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def references(models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Uninterrupted outputs, made once per (family, method) on first use."""
    root = tmp_path_factory.mktemp("resume-references")

    class Outputs(dict):
        def __missing__(self, key):
            family, method = key
            out = root / f"{family}-{method}"
            assert _quantize(models[family], out, method) == 0
            self[key] = out
            return out

    return Outputs()


@pytest.fixture(scope="module")
def killed_state(models, tmp_path_factory) -> Path:
    """The state a tiny Llama GPTQ run leaves when killed after its second block (copy it before changing it)."""
    out = tmp_path_factory.mktemp("resume-killed") / "out"
    with pytest.MonkeyPatch.context() as m:
        return _killed_run(m, models["llama"], out, 1)


def _args(model: Path, out: Path, method: str = "gptq", *extra: str) -> list[str]:
    text = str(model.parent / TEXT)
    return ["quantize", str(model), "--out", str(out), *METHODS[method], *CALIB, "--calib-text", text, "--text", text,
            *extra]


def _quantize(model: Path, out: Path, method: str = "gptq", *extra: str) -> int:
    return main(_args(model, out, method, *extra))


def _killed_run(monkeypatch, model: Path, out: Path, block: int, method: str = "gptq") -> Path:
    """Run until block ``block`` is saved, then die; returns the state folder left behind."""
    die_after_block(monkeypatch, block)
    with pytest.raises(Killed):
        _quantize(model, out, method)
    monkeypatch.undo()
    assert not out.exists()
    return state_folder(out)


def _copy_state(state: Path, out: Path) -> Path:
    return Path(shutil.copytree(state, state_folder(out)))


def _assert_same_bytes(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    different = [n for n in names if n != REPORT and (a / n).read_bytes() != (b / n).read_bytes()]
    assert not different, different


def _one_line_error(capsys, match: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1 and match in lines[0], err
    return lines[0]


def test_two_runs_write_the_same_bytes(models, references, tmp_path):
    out = tmp_path / "again"
    assert _quantize(models["llama"], out) == 0
    _assert_same_bytes(references["llama", "gptq"], out)
    assert not state_folder(out).exists(), "a finished run leaves no state behind"


@pytest.mark.parametrize("family, method, block", [("llama", "gptq", 0), ("llama", "gptq", 2), ("qwen2", "gptq", 1),
                                                   ("llama", "awq", 0), ("llama", "stream", 1)])
def test_killed_after_a_block_and_resumed_writes_the_same_bytes(models, references, tmp_path, monkeypatch, caplog,
                                                                family, method, block):
    out = tmp_path / "out"
    state = _killed_run(monkeypatch, models[family], out, block, method)
    assert json.loads((state / "state.json").read_text())["blocks_done"] == block + 1
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        assert _quantize(models[family], out, method, "--resume") == 0
    assert f"{block + 1} blocks already done" in caplog.text
    _assert_same_bytes(references[family, method], out)
    assert not state.exists()


def test_without_resume_an_old_state_is_replaced(models, references, killed_state, tmp_path, caplog):
    out = tmp_path / "out"
    state = _copy_state(killed_state, out)
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        assert _quantize(models["llama"], out) == 0
    assert "replacing the calibration state" in caplog.text
    _assert_same_bytes(references["llama", "gptq"], out)
    assert not state.exists()


@pytest.mark.parametrize("change, match", [(["--damp", "0.05"], "another recipe"),
                                           (["--calib-samples", "5"], "another calibration data"),
                                           (["--calib-dtype", OTHER_DTYPE], "another recipe"),
                                           ("other-model", "another model")])
def test_a_state_of_other_inputs_is_refused(models, killed_state, tmp_path, capsys, change, match):
    out = tmp_path / "out"
    state = _copy_state(killed_state, out)
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    model, extra = models["llama"], change
    if change == "other-model":
        model, extra = Path(shutil.copytree(model, model.parent / "llama-copy", dirs_exist_ok=True)), []
    capsys.readouterr()
    assert main(_args(model, out, "gptq", *extra, "--resume")) == 2
    line = _one_line_error(capsys, match)
    assert str(state) in line
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before


@pytest.mark.parametrize("damage", ["truncate block", "garble state.json", "delete inputs"])
def test_a_damaged_state_is_a_one_line_error(models, killed_state, tmp_path, capsys, damage):
    out = tmp_path / "out"
    state = _copy_state(killed_state, out)
    if damage == "truncate block":
        block = state / "block-00001.safetensors"
        block.write_bytes(block.read_bytes()[:-100])
    elif damage == "garble state.json":
        (state / "state.json").write_text('{"lowbit_calib_state": 1, "fingerp')
    else:
        next(state.glob("inputs-*")).unlink()
    capsys.readouterr()
    assert _quantize(models["llama"], out, "gptq", "--resume") == 2
    _one_line_error(capsys, "is damaged")
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_resume_is_refused_for_the_gguf_format(models, tmp_path, capsys):
    assert main(["quantize", str(models["llama"]), "--format", "gguf", "--out", str(tmp_path / "g.gguf"),
                 "--resume"]) == 2
    _one_line_error(capsys, "--resume")


DRIVER = """
import sys, time
from lowbit.cli import main
from lowbit.pipeline.resume import BlockState
save = BlockState.save_block
def slow_save(self, index, *args, **kwargs):  # blocks after the first take a second longer: the kill lands mid-block
    if index >= 1:
        time.sleep(1.0)
    save(self, index, *args, **kwargs)
BlockState.save_block = slow_save
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_of_a_real_process_then_resume_writes_the_same_bytes(models, references, tmp_path):
    out = tmp_path / "out"
    state_json = state_folder(out) / "state.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as this process
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *_args(models["llama"], out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not state_json.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert json.loads(state_json.read_text())["blocks_done"] == 1
    assert _quantize(models["llama"], out, "gptq", "--resume") == 0
    _assert_same_bytes(references["llama", "gptq"], out)
