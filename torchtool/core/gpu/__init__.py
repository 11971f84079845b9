"""gpu-reset: who holds the GPUs (NVML and /proc), ending only what is safe to end, and resetting an idle GPU (no torch).

The GPU side is behind :class:`Backend`: :class:`Nvml` is the real one (nvidia-ml-py);
:class:`StandIn` reads a JSON description named by ``TORCHTOOL_GPU_STANDIN`` and exists for
the tests on machines without a GPU (it reports real processes as GPU users, so the
selection, the start-time guard and the signalling below run for real). Everything about
processes comes from /proc: owner, command line, start time (field 22 of /proc/PID/stat),
open /dev/nvidia* files.

- :mod:`~torchtool.core.gpu.proc`: /proc (owner, command, start time, open device files).
- :mod:`~torchtool.core.gpu.nvml`: the backends (NVML and the stand-in).
- :mod:`~torchtool.core.gpu.reset`: the safety rules, the signals, the reset.
"""

from torchtool.core.gpu.nvml import STANDIN_ENV, Gpu
from torchtool.core.gpu.proc import Holder, proc_start_ticks
from torchtool.core.gpu.reset import execute, plan, reset_gpu

__all__ = ["STANDIN_ENV", "Gpu", "Holder", "execute", "plan", "proc_start_ticks", "reset_gpu"]
