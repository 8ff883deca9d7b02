"""Orbax checkpoints of the train state: the last K steps, plus the best by eval top-1."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Two Orbax ``CheckpointManager`` s under ``workdir/checkpoints``: ``last`` and ``best``.

    Every process of a multi-host run calls the same methods; Orbax writes each array once.
    """

    def __init__(self, workdir: str, keep: int = 3):
        root = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.last_dir = os.path.join(root, "last")
        self.best_dir = os.path.join(root, "best")
        self.last = ocp.CheckpointManager(
            self.last_dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )
        self.best = ocp.CheckpointManager(
            self.best_dir,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda metrics: metrics["top1"], best_mode="max"
            ),
        )

    def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
        """Saves ``state`` at ``step`` (and into ``best`` when ``metrics`` are given), then waits."""
        self.last.save(step, args=ocp.args.StandardSave(state), force=True)
        if metrics is not None:
            self.best.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.last.latest_step()

    def restore_latest(self, like: Any) -> Any:
        """The newest state, restored with the shapes, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.last.restore(self.last.latest_step(), args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        """Finishes pending writes."""
        self.last.close()
        self.best.close()


def restore_newest(manager_dir: str) -> tuple[int, Any] | None:
    """The newest checkpoint under ``manager_dir`` (``.../checkpoints/last`` or ``best``) as nested dicts of
    arrays on this process's first device, whatever device topology saved it; None if there is none."""
    if not os.path.isdir(manager_dir):
        return None
    manager = ocp.CheckpointManager(manager_dir, item_handlers=ocp.StandardCheckpointHandler())
    try:
        step = manager.latest_step()
        if step is None:
            return None
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                manager.item_metadata(step))
        return step, manager.restore(step, args=ocp.args.StandardRestore(abstract))
    finally:
        manager.close()


def restore_run(workdir: str, prefer: str = "best") -> tuple[str, int, Any] | None:
    """A training workdir's checkpoint: the newest of ``checkpoints/<prefer>``, else of
    ``checkpoints/last``, as ``(which, step, tree)`` (see :func:`restore_newest`); None if neither has one."""
    for which in dict.fromkeys((prefer, "last")):
        found = restore_newest(os.path.join(workdir, "checkpoints", which))
        if found is not None:
            return (which, *found)
    return None
