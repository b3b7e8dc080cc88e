"""A ``kill -9`` stand-in for resume tests: the calibrated pipeline dies right after a block's state is saved."""

from __future__ import annotations

from lowbit.pipeline.resume import BlockState


class Killed(BaseException):
    """Stands for ``kill -9`` in-process: nothing catches it, and the pipeline does no clean-up of its own."""


def die_after_block(monkeypatch, block: int | None = None) -> None:
    """Make the run raise ``Killed`` once block ``block``'s state is saved (None: after the first saved block)."""
    save = BlockState.save_block

    def save_then_die(self, index, *args, **kwargs):
        save(self, index, *args, **kwargs)
        if block is None or index == block:
            raise Killed

    monkeypatch.setattr(BlockState, "save_block", save_then_die)
