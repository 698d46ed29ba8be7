"""Numerics across backends: eager PyTorch vs the bundle's graphs on ONNX Runtime (and TensorRT where present).

Each family's exporter module provides

    verify_cases(model, cfg, bundle, batch_size: int, decode_steps: int, seed: int) -> list[VerifyCase]

one case per graph call (the prefill, then each decode step fed the eager caches of the step before), with the
outputs eager PyTorch computes for it. ``verify`` runs every case on every requested backend and compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class VerifyCase:
    graph: str  # bundle graph name
    label: str  # row label in the table: "prefill", "decode 3", ...
    feeds: dict[str, np.ndarray]  # graph input name -> value
    expected: dict[str, np.ndarray]  # graph output name -> eager PyTorch value
