"""Drive a production Triton autotuner through several configs on CPU.

Under the interpreter the kernels carry one config (Triton's benchmarker needs a GPU), so the
autotuner's bench-every-config-then-launch-the-winner sequence never runs in CPU tests. This builds
a copy of a production autotuned kernel with the given configs, the production ``key``,
``reset_to_zero`` and ``restore_value``, and a benchmark stand-in that launches each config once
(as the real benchmark does, on the caller's buffers) and makes ``configs[winner]`` the fastest.
"""

from __future__ import annotations

import triton


def autotuner_with_winner(kernel, configs: list[triton.Config], winner: int, prune=None):
    """A copy of ``kernel`` (a ``triton.runtime.Autotuner``) that benchmarks ``configs`` in order
    (those that ``prune``, an ``early_config_prune``, keeps; ``winner`` indexes the kept ones)."""
    launches: list[int] = []

    def bench(kernel_call, quantiles):
        index = len(launches)
        launches.append(index)
        kernel_call()
        t = 1.0 if index == winner else 2.0
        return [t] * len(quantiles)

    return triton.autotune(
        configs=configs, key=list(kernel.keys), reset_to_zero=list(kernel.reset_to_zero) or None,
        restore_value=list(kernel.restore_value) or None, do_bench=bench,
        prune_configs_by={"early_config_prune": prune} if prune else None,
    )(kernel.fn)
