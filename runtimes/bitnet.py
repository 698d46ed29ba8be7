"""BitNet's sampling loop over a bundle's step graphs (exporters/bitnet.py), any runner.

The same computation as bitnet.generate_cached (the eager backend): runtimes/windowed.py's loop (see
tests/test_export_bitnet.py for greedy equality with eager).
"""

from __future__ import annotations

import time

import numpy as np

from bytedeploy.families import bitnet
from bytedeploy.generation import GenerateRequest, GenerateResult, map_steps, stepwise
from bytedeploy.runtimes.windowed import generate_windowed


@stepwise
def generate(bundle, runner, request: GenerateRequest) -> GenerateResult:
    cfg = bundle.family_config()
    ids = list(request.prompt or bitnet.EMPTY_PROMPT)
    max_new = request.max_new or bitnet.DEFAULT_MAX_NEW
    t0 = time.perf_counter()
    rows = yield from map_steps(generate_windowed.steps(bundle, runner, cfg.block_size, ids, max_new,
                                                        request.sampling, request.batch_size), to_bytes)
    seconds = time.perf_counter() - t0
    return GenerateResult(to_bytes(rows), int(rows.size), seconds, bitnet.UNIT)


def to_bytes(rows: np.ndarray) -> list[bytes]:
    return [bytes(row) for row in rows.tolist()]
