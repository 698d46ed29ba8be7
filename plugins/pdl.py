"""Programmatic dependent launch (PDL) for the Triton kernels: each kernel starts while the previous one still runs.

A decode step at batch 1 is a chain of few-microsecond kernels, and inside a CUDA graph much of each one's time is
the launch and the first DRAM round trip. With PDL (sm_90 and newer) a kernel calls ``let_next_kernel_launch``
first thing, so the next kernel is launched as soon as every program of this one has started (and SM room allows).
A kernel loads what no earlier kernel writes (its weights) and then calls ``wait_for_previous_kernel``, which
blocks until the previous kernel has finished and its writes are visible (griddepcontrol.wait). Everything a
kernel writes, and everything it reads that an earlier kernel wrote, comes after that call. (The previous kernel
finished only after its own wait returned, so every earlier kernel has finished too.)

    kernel[grid](..., **launch_options(x.device))          # PDL=True, launch_pdl=True where it applies

``ENABLED`` (env BYTEDEPLOY_PDL=0 turns it off) lets the benchmarks measure both.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ENABLED = os.environ.get("BYTEDEPLOY_PDL", "1") != "0"


@functools.cache
def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_options(device: torch.device) -> dict:
    """The kernel's PDL constexpr and Triton's launch_pdl option for tensors on device: on for CUDA sm_90+ (not
    under the CPU interpreter) while ENABLED."""
    on = (ENABLED and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
          and _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device()))
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


if triton is not None:

    @triton.jit
    def let_next_kernel_launch(PDL: tl.constexpr):
        """With PDL: the next kernel may launch once every program of this one has called this."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def wait_for_previous_kernel(PDL: tl.constexpr):
        """With PDL: block until the previous kernel has finished, its writes visible. Without: nothing (the
        launch itself waited)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
