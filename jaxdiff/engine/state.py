"""The training state most tasks share: one pytree holding everything a step reads and writes (and a checkpoint
saves). A task may use another pytree (a dict with a ``step`` key); the engine only needs ``step``."""
from __future__ import annotations

import flax
import jax


class TrainState(flax.struct.PyTreeNode):
    """step: int32 () optimizer steps taken; params: float32 net params; ema: EMA of params (same tree);
    opt_state: the optimizer's state; buffers: the net's non-trained variables ({} if none: NCSN++'s Fourier
    frequencies, BatchNorm statistics); nonfinite: int32 () count of steps whose gradients (or loss) held a NaN or
    inf."""

    step: jax.Array
    params: dict
    ema: dict
    opt_state: object
    buffers: dict
    nonfinite: jax.Array

    def variables(self, params=None, collection: str = 'buffers') -> dict:
        """The net's variables {'params': params (default self.params), collection: buffers} for net.apply
        (``collection``: where the net keeps its buffers, e.g. 'batch_stats'; left out when there are none)."""
        out = {'params': self.params if params is None else params}
        if self.buffers:
            out[collection] = self.buffers
        return out
