"""The hardware's limits, measured in the same run, and the fraction of them a call reaches."""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Optional

import torch

from .timing import call_seconds


@dataclasses.dataclass(frozen=True)
class Peaks:
    """What this device reaches on the simplest kernels, measured in the same run.

    Attributes
    ----------
    bandwidth_gbps : float
        Copying a large tensor: bytes read + written per second, / 1e9.
    tflops : dict
        Per dtype name ("float32", "bfloat16", ...): a large square matmul's FLOP/s, / 1e12.
    """

    bandwidth_gbps: float
    tflops: Dict[str, float]


def measure_peaks(device, dtypes: Iterable[torch.dtype]) -> Peaks:
    """Measure the copy bandwidth and the matmul rate of each dtype on ``device`` (fastest calls).

    These are the limits a kernel is held to (DESIGN.md, "Performance method"): a matmul
    from torch's BLAS is as close to the FLOP peak as this machine gets in practice, and a
    tensor copy as close to the memory bandwidth.

    Parameters
    ----------
    device : str or torch.device
    dtypes : iterable of torch.dtype

    Returns
    -------
    Peaks
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    # A peak is the best the device showed: the fastest call, not the median.
    elements = (1 << 28) // 4  # 256 MB: past any cache, CPU or GPU
    # Random data, never constants: a GPU's matmul runs measurably faster on zeros or ones.
    generator = torch.Generator(device=device).manual_seed(0)
    source = torch.randn(elements, dtype=torch.float32, device=device, generator=generator)
    target = torch.empty_like(source)
    seconds = min(call_seconds(lambda: target.copy_(source), device, 20 if on_gpu else 10))
    bandwidth = 2 * source.numel() * 4 / seconds / 1e9
    size = 8192 if on_gpu else 4096  # large enough for the BLAS to reach its best rate
    tflops = {}
    for dtype in dict.fromkeys(dtypes):
        a = torch.randn(size, size, dtype=torch.float32, device=device, generator=generator).to(dtype)
        seconds = min(call_seconds(lambda: a @ a, device, 20 if on_gpu else 5))
        tflops[str(dtype).replace("torch.", "")] = 2 * size**3 / seconds / 1e12
    return Peaks(bandwidth, tflops)


def roofline_fraction(flops: Optional[int], bytes_moved: Optional[int], seconds: float, dtype: str,
                      peaks: Peaks) -> Optional[float]:
    """The fraction of the hardware's limit a call reached: the roofline floor over its time.

    The floor is the larger of FLOPs / the dtype's matmul rate and bytes / the copy
    bandwidth: whichever resource the call cannot do faster than.

    Parameters
    ----------
    flops, bytes_moved : int or None
        The call's work (None where not counted).
    seconds : float
        Its median time.
    dtype : str
        Its inputs' dtype name, for the FLOP rate.
    peaks : Peaks

    Returns
    -------
    float or None
        None when neither work is counted.
    """
    floors = []
    if flops and dtype in peaks.tflops:
        floors.append(flops / (peaks.tflops[dtype] * 1e12))
    if bytes_moved:
        floors.append(bytes_moved / (peaks.bandwidth_gbps * 1e9))
    return max(floors) / seconds if floors else None
