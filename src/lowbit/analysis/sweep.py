"""Running a sweep's rows in this process or as Ray tasks, one JSON file per row.

A sweep is a list of independent rows (``lowbit compare``'s schemes x methods x models). Each ``RowTask`` names the
file its row goes to, a key of everything the row depends on, and a picklable function that measures it. Running a
task returns the row from its file when the file holds the same key; otherwise it measures the row and writes
``{"key", "row"}`` atomically (a temporary name beside the target, then a rename). Every task is therefore
idempotent: a rerun — of the whole sweep after an interruption, or of one task that Ray retries after its worker was
lost (``max_retries``) — reuses what is finished and never reads a half-written row.

With ``SweepOptions(ray=True)`` the missing rows become Ray remote tasks on a local Ray instance (``ray.init()``) or
on the cluster at ``address``; Ray does the scheduling, placement and retries. Ray is imported only then, so lowbit
works without it. Workers must see the same paths as this process (model, output folder): on one machine they do;
on a cluster, put them on a shared filesystem and install lowbit on every node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.io_utils import atomic_file

RAY_INSTALL = "pip install 'lowbit[ray]' (or pip install ray)"


@dataclass(frozen=True)
class SweepOptions:
    """Where a sweep runs: in this process (default), or as Ray tasks (``ray``) on the Ray instance this process
    already joined, else a new local one (or the cluster ``RAY_ADDRESS`` names, as ``ray.init`` does) or, with
    ``address``, that cluster. ``max_retries`` is Ray's: how often a task whose worker died is run again (errors
    raised by the task are not retried; they are the same on every attempt). ``num_cpus`` is what each task
    reserves; with 1, a 2-core machine runs two rows at once."""

    ray: bool = False
    address: str | None = None
    max_retries: int = 3
    num_cpus: float = 1.0


@dataclass(frozen=True)
class RowTask:
    """One row of a sweep: ``measure(progress)`` computes it, ``path`` keeps it, ``key`` says the kept row is still
    current. ``measure`` must pickle (a module-level function or a ``functools.partial`` of one) to run on Ray."""

    label: str
    path: Path
    key: str
    measure: Callable[[bool], dict[str, Any]]


def read_row(path: Path, key: str) -> dict[str, Any] | None:
    """The row kept at ``path`` if it was written under ``key``; None when missing, unreadable or stale."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data.get("row") if isinstance(data, dict) and data.get("key") == key else None


def run_task(task: RowTask, progress: bool = False) -> dict[str, Any]:
    """The task's row: read from its file when current, else measured and written atomically."""
    row = read_row(task.path, task.key)
    if row is not None:
        return row
    row = task.measure(progress)
    with atomic_file(task.path, force=True) as tmp:
        Path(tmp).write_text(json.dumps({"key": task.key, "row": row}, indent=1))
    return row


def run_sweep(tasks: Sequence[RowTask], sweep: SweepOptions = SweepOptions(),
              progress: bool = True) -> list[dict[str, Any]]:
    """Every task's row, in task order; in this process one after another, or on Ray side by side."""
    if sweep.ray:
        return _run_on_ray(tasks, sweep, progress)
    return [run_task(t, progress) for t in tqdm(tasks, desc="sweep", disable=not progress or len(tasks) < 2)]


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise LowbitError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def _run_on_ray(tasks: Sequence[RowTask], sweep: SweepOptions, progress: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any] | None] = [read_row(t.path, t.key) for t in tasks]
    todo = [i for i, row in enumerate(rows) if row is None]
    if not todo:
        return rows  # type: ignore[return-value]
    ray = import_ray()
    started = _connect(ray, sweep)
    try:
        remote = ray.remote(run_task)
        index = {remote.options(name=tasks[i].label, max_retries=sweep.max_retries, num_cpus=sweep.num_cpus)
                 .remote(tasks[i]): i for i in todo}
        errors = []
        with tqdm(total=len(index), desc="sweep (ray)", disable=not progress) as bar:
            pending = list(index)
            while pending:  # collect every task, so one failure does not throw away rows still being measured
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        rows[index[ref]] = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        errors.append((tasks[index[ref]], exc))
                    bar.update()
    finally:
        if started:
            ray.shutdown()
    if errors:
        raise _task_error(ray, sweep, *errors[0])
    return rows  # type: ignore[return-value]


def _connect(ray: Any, sweep: SweepOptions) -> bool:
    """Join the Ray instance this process already has, else start a local one (or connect to ``address``);
    returns whether this call started it (and so should shut it down)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=sweep.address, logging_level="WARNING")
    except ConnectionError as exc:
        raise LowbitError(f"could not reach a Ray cluster at {sweep.address}: {exc}; check --ray-address "
                          "(HOST:6379 of the head node, or ray://HOST:10001)") from None
    return True


def _task_error(ray: Any, sweep: SweepOptions, task: RowTask, exc: Exception) -> Exception:
    """A user error raised inside a task as the same one line; a lost worker as one line; a bug as it came."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        return LowbitError(f"{task.label}: {cause}") if isinstance(cause, LowbitError) else exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return LowbitError(f"{task.label}: Ray could not finish this row after {sweep.max_retries + 1} attempts "
                       f"({type(exc).__name__}: {first}); finished rows are kept, rerun to resume")
