"""Overlapping gradient reduction and parameter gathering with compute, wired as Megatron-LM does.

megatron-core's DDP can reduce each gradient bucket as soon as backward has filled it
(``--overlap-grad-reduce``) and, with the distributed optimizer, all-gather each bucket's updated
parameters just before the next forward needs them (``--overlap-param-gather``). The schedules
and the DDP wrapper do the work; the training loop only has to hand them the right callbacks and
keep the parameters whole whenever someone reads them outside a training forward. This module is
that part of Megatron-LM's ``megatron/training/training.py`` (``train()``, core_v0.16):

- ``config.no_sync_func``: the schedules run every micro-batch but the last inside it, so that a
  bucket is reduced once per step, after its last gradient contribution;
- ``config.grad_sync_func``: lets pipeline schedules start a chunk's reduction early
  (Megatron-LM's ``--align-grad-reduce``, on by default);
- ``config.param_sync_func``: only with ``--align-param-gather`` (off by default, as there);
- the forward pre-hooks that wait for each bucket's parameter all-gather are off for the first
  iteration (nothing has been updated yet) and switched off, with a synchronous gather, around
  evaluation and checkpoint saves, which read the parameters directly.
"""

from __future__ import annotations

import contextlib


def _one_or_list(fns: list):
    return fns[0] if len(fns) == 1 else fns


class OverlapControl:
    """Owns the overlap callbacks on the ``TransformerConfig`` and the DDP forward pre-hooks."""

    def __init__(self, model: list, config, *, overlap_grad_reduce: bool, param_hooks: bool):
        self.model = model
        self.param_hooks = param_hooks
        if overlap_grad_reduce:
            if config.no_sync_func is not None:
                raise RuntimeError("config.no_sync_func is already set")
            config.no_sync_func = _one_or_list([chunk.no_sync for chunk in model])
            config.grad_sync_func = _one_or_list([chunk.start_grad_sync for chunk in model])
        self.hooks_on = param_hooks  # megatron-core's DDP registers them in its constructor
        if param_hooks:
            # Megatron-LM's train(): the parameters are already whole before the first update.
            self._disable(param_sync=False)

    def _disable(self, param_sync: bool) -> None:
        for chunk in self.model:
            chunk.disable_forward_pre_hook(param_sync=param_sync)
        self.hooks_on = False

    def _enable(self) -> None:
        for chunk in self.model:
            chunk.enable_forward_pre_hook()
        self.hooks_on = True

    def after_step(self) -> None:
        """From the second forward on, the pre-hooks gather what the optimizer updated."""
        if self.param_hooks and not self.hooks_on:
            self._enable()

    @contextlib.contextmanager
    def params_whole(self):
        """Parameters gathered (synchronously) for readers outside a training forward."""
        if not self.hooks_on:
            yield
            return
        self._disable(param_sync=True)
        try:
            yield
        finally:
            self._enable()

    def finish(self) -> None:
        """End of training: leave every parameter gathered."""
        if self.hooks_on:
            self._disable(param_sync=True)
