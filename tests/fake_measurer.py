"""A measurer that misbehaves on purpose, to test how the study records bad configs.

On the first launch config of a unit: block_m 16 and block_n 16 kills the worker process (as a
CUDA fault would), block_m 16 and block_n 64 fails to compile, block_m 64 and block_n 16 gives
wrong results; everything else is measured for real.
"""

import os

from sparvar.autotune.measure import Measurement, StepMeasurer


class FaultyMeasurer(StepMeasurer):
    def measure(self, kind, step, configs, plan=None):
        cfg = next(iter(configs.values()), None)
        if cfg is not None:
            if (cfg.block_m, cfg.block_n) == (16, 16):
                os._exit(3)
            if (cfg.block_m, cfg.block_n) == (16, 64):
                return Measurement("compile", message="OutOfResources: shared memory (injected)")
            if (cfg.block_m, cfg.block_n) == (64, 16):
                return Measurement("wrong", message="out relative error 1.0e+00 (injected)")
        return super().measure(kind, step, configs, plan)
