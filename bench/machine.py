"""The name of the device a benchmark ran on, the same in every bench log.

Bench scripts run as ``python bench/x.py``, so ``bench/`` is on ``sys.path`` and they import this module as
``machine``. A measured figure is only worth its machine's name: ``platform.processor()`` is empty on most Linux
systems and ``platform.machine()`` only says ``x86_64``, so the CPU model is read from ``/proc/cpuinfo`` first.
"""
from __future__ import annotations

import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def device_name(device: torch.device | str = "cpu") -> str:
    """``torch.cuda.get_device_name`` for a CUDA device ("NVIDIA H200"), else the CPU model ("AMD EPYC 7B13"), else
    ``platform.processor()`` / ``platform.machine()``. torch is imported only for a CUDA device, so CPU-only benches
    (masks, crop/stitch) stay free of it."""
    if str(getattr(device, "type", device)).split(":")[0] == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
