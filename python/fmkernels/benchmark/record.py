"""What a benchmark run records beside its rows: the machine it ran on, and the JSON file."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform as host
from typing import Any, Dict, Optional, Sequence

import torch

from .. import __version__, platform
from .roofline import Peaks
from .run import BenchRow


def device_name(device) -> str:
    """The GPU's name (torch.cuda.get_device_name), or the CPU's model name.

    Parameters
    ----------
    device : str or torch.device

    Returns
    -------
    str
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return host.processor() or host.machine()


def cpu_isa() -> Optional[str]:
    """The instruction set fmkernels' C++ CPU kernels chose on this machine ("avx512", "avx2"
    or "generic", after any FMKERNELS_CPU_ISA cap), or None without the extension."""
    module = platform.cpu_module()
    return module.isa() if module is not None and hasattr(module, "isa") else None


def device_label(device) -> str:
    """How a table names the device: ``device_name``, and on the CPU the kernels' instruction set
    ("Intel(R) Xeon(R) Processor, avx512")."""
    isa = cpu_isa() if torch.device(device).type == "cpu" else None
    return device_name(device) + (f", {isa}" if isa else "")


def metadata(device, command: str, peaks: Optional[Peaks] = None) -> Dict[str, Any]:
    """What a benchmark JSON records beside its rows, so a figure is never quoted without its device.

    Parameters
    ----------
    device : str or torch.device
    command : str
        The command line that produced the rows.
    peaks : Peaks, optional
        The measured limits the rows' roofline fractions refer to.

    Returns
    -------
    dict
        device, device_name, cpu_threads, torch_version, fmkernels_version, date (UTC,
        ISO 8601), command, and peak_bandwidth_gbps and peak_tflops when measured; on the
        CPU also cpu_isa, the instruction set fmkernels' C++ kernels run ("avx512", "avx2" or
        "generic"; None where the extension is not built).
    """
    extra = {} if peaks is None else {"peak_bandwidth_gbps": peaks.bandwidth_gbps, "peak_tflops": peaks.tflops}
    if torch.device(device).type == "cpu":
        extra["cpu_isa"] = cpu_isa()
    return {
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "fmkernels_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        **extra,
    }


def write_json(path: str, rows: Sequence[BenchRow], meta: Dict[str, Any]) -> None:
    """Write ``{"metadata": meta, "rows": [...]}`` to ``path`` (parent folders created).

    Parameters
    ----------
    path : str
    rows : sequence of BenchRow, or of dicts (a bench/ script's own rows)
    meta : dict
        From ``metadata``.
    """
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    rows = [row if isinstance(row, dict) else dataclasses.asdict(row) for row in rows]
    with open(path, "w") as file:
        json.dump({"metadata": meta, "rows": rows}, file, indent=2)
        file.write("\n")
