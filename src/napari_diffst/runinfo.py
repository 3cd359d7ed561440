"""What a run records about the machine it ran on (load average, CPU, threads, versions): shared by
``benchmark``, ``truth_bench`` and ``bench-speed``."""
from __future__ import annotations

import os
import platform

__all__ = ["loadavg", "machine_info"]


def loadavg() -> list | None:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(device_label: str, load_start=None) -> dict:
    """Platform, CPU model, CPUs available, torch threads, versions, accelerator and load at start / now."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        n_avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        n_avail = os.cpu_count()
    return {"platform": platform.platform(), "cpu": cpu, "cpus_available": n_avail,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "accelerator": device_label,
            "load_avg_at_start": load_start, "load_avg_at_end": loadavg()}
