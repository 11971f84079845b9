"""gpu-reset: who holds the GPUs (NVML and /proc), ending only what is safe to end, and resetting an idle GPU (no torch).

The GPU side is behind :class:`Backend`: :class:`Nvml` is the real one (nvidia-ml-py);
:class:`StandIn` reads a JSON description named by ``TORCHTOOL_GPU_STANDIN`` and exists for
the tests on machines without a GPU (it reports real processes as GPU users, so the
selection, the start-time guard and the signalling below run for real). Everything about
processes comes from /proc: owner, command line, start time (field 22 of /proc/PID/stat),
kernel-thread flag, name (/proc/PID/comm), open /dev/nvidia* files.

- :mod:`~torchtool.core.gpu.proc`: /proc (owner, command, start time, open device files).
- :mod:`~torchtool.core.gpu.nvml`: the backends (NVML and the stand-in).
- :mod:`~torchtool.core.gpu.rules`: the safety rules: who may be ended, and why the others are left.
- :mod:`~torchtool.core.gpu.reset`: the signals, the reset.
"""

from torchtool.core.gpu.nvml import STANDIN_ENV, Gpu
from torchtool.core.gpu.proc import Holder, proc_start_ticks
from torchtool.core.gpu.reset import MAX_TIMEOUT, execute, plan, reset_gpu
from torchtool.core.gpu.rules import Rules

__all__ = ["MAX_TIMEOUT", "STANDIN_ENV", "Gpu", "Holder", "Rules", "execute", "plan", "proc_start_ticks",
           "reset_gpu"]
