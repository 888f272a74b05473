"""What the bench ran on: CPU model, cores, memory, load, versions (blocking; reads /proc)."""

from __future__ import annotations

import os
import platform
import shutil
from typing import Any

import psutil

__all__ = ["cpu_model", "cpu_pressure", "machine_info"]


def cpu_model() -> str:
    """The first ``model name`` of ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_pressure() -> float | None:
    """``some avg60`` of ``/proc/pressure/cpu``: percent of time a task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    fields = dict(item.split("=") for item in line.split()[1:])
                    return float(fields["avg60"])
    except (OSError, KeyError, ValueError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """A JSON-ready description of this machine and the software versions in use."""
    import numpy
    import ray
    import torch

    shm = shutil.disk_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
    cuda = torch.cuda.is_available()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "ram_available_bytes": psutil.virtual_memory().available,
        "dev_shm_bytes": shm.total if shm else None,
        "load_average": list(os.getloadavg()),
        "cpu_pressure_some_avg60": cpu_pressure(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
    }
