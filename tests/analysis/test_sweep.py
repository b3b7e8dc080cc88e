"""Compare sweeps on Ray and in this process: a 4-task batch (two tiny architectures x two schemes) gives the same
rows either way; a finished row is never measured again; a task whose worker dies is rerun by Ray and gives the
in-process row; errors come back as one line, and so does a missing Ray.

One local Ray instance (2 CPUs, no dashboard) serves the whole module; the sweep joins it instead of starting one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from lowbit.analysis.compare import TIMING_FIELDS, CompareOptions, build_rows, row_tasks
from lowbit.analysis.sweep import RowTask, SweepOptions, read_row, run_sweep, run_task
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.workflow import EvalOptions, QuantizeOptions
from tests.arch_models import save_tiny

ray = pytest.importorskip("ray")

FAMILIES = ("llama", "qwen2")
ARGS = ["--schemes", "W8A16,W4A16", "--group-size", "32", "--windows", "2", "--window-length", "64",
        "--no-sensitivity"]
NAMES = ["W8A16 g32 rtn", "W4A16 g32 rtn"]


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_FIELDS}


def page_rows(out: Path) -> list[dict]:
    return [untimed(r) for r in json.loads((out / "compare.json").read_text())["rows"]]


def kept_rows(out: Path) -> dict[str, tuple[str, dict]]:
    """Every row file under ``out/rows``: name -> (key, row without timings)."""
    kept = {p.name: json.loads(p.read_text()) for p in (out / "rows").glob("*.json")}
    return {name: (data["key"], untimed(data["row"])) for name, data in kept.items()}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return root, [save_tiny(family, root / family) for family in FAMILIES]


@pytest.fixture(scope="module")
def in_process(models):
    root, folders = models
    out = root / "in-process"
    assert main(["compare", *map(str, folders), "--out", str(out), *ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def on_ray(models, local_ray):
    root, folders = models
    out = root / "ray"
    assert main(["compare", *map(str, folders), "--out", str(out), *ARGS, "--ray"]) == 0
    return out


def test_ray_rows_equal_in_process_rows(in_process, on_ray):
    for family in FAMILIES:
        expected = page_rows(in_process / family)
        assert [r["name"] for r in expected] == NAMES
        assert page_rows(on_ray / family) == expected
        assert len(kept_rows(in_process / family)) == 2 and kept_rows(on_ray / family) == kept_rows(in_process / family)
    llama, qwen2 = (page_rows(in_process / f) for f in FAMILIES)
    assert llama[0]["kld"] < llama[1]["kld"] and llama[0]["kld"] != qwen2[0]["kld"]  # two models, really measured


def test_a_finished_row_is_not_measured_again(models, on_ray):
    root, folders = models
    rows = sorted((on_ray / FAMILIES[0] / "rows").glob("*.json"))
    assert len(rows) == 2
    before = {p: (p.stat().st_mtime_ns, p.read_text()) for p in rows}
    assert main(["compare", *map(str, folders), "--out", str(on_ray), *ARGS, "--ray"]) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in rows} == before


def test_a_task_returns_its_kept_row_without_measuring(on_ray, local_ray):
    path = next((on_ray / FAMILIES[0] / "rows").glob("*.json"))
    kept = json.loads(path.read_text())
    task = RowTask("kept", path, kept["key"], partial(_refuse))
    assert run_task(task) == kept["row"]
    assert ray.get(ray.remote(run_task).remote(task)) == kept["row"]  # the check a retried Ray task relies on
    assert read_row(path, "another key") is None  # a changed option is measured again


def test_a_lost_worker_reruns_its_row(models, in_process, local_ray):
    root, folders = models
    base = QuantizeOptions(model=str(folders[0]), group_size=32, eval=EvalOptions(windows=2, length=64))
    opts = CompareOptions(base=base, rows=build_rows(("W8A16",), ("rtn",), (), (), (), 32), out=root / "lost",
                          sensitivity=False)
    (task,) = row_tasks(opts)
    marker = root / "lost-died"
    dying = replace(task, measure=partial(_die_once, str(marker), task.measure))
    (row,) = run_sweep([dying], SweepOptions(ray=True, max_retries=2), progress=False)
    assert marker.exists()  # the first attempt's worker died
    assert (task.key, untimed(row)) == kept_rows(in_process / FAMILIES[0])[task.path.name]
    assert read_row(task.path, task.key) == row


def test_an_error_inside_a_ray_task_is_one_line(tmp_path, local_ray):
    task = RowTask("tiny: W4A16", tmp_path / "row.json", "k", partial(_refuse))
    with pytest.raises(LowbitError, match=r"^tiny: W4A16: no such option$"):
        run_sweep([task], SweepOptions(ray=True), progress=False)
    assert not task.path.exists()


def test_ray_not_installed_is_one_line(models, monkeypatch, capsys):
    _, folders = models
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["compare", str(folders[0]), "--out", str(folders[0].parent / "never"), *ARGS, "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'lowbit[ray]'" in err
    assert not (folders[0].parent / "never").exists()


def _refuse(progress: bool) -> dict:
    raise LowbitError("no such option")


def _die_once(marker: str, measure, progress: bool) -> dict:
    """Kill this worker process the first time (as a lost node would), measure the second time."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return measure(progress)
