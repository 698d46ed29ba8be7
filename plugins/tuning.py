"""How the Triton kernels' autotuners time their candidates: the BitLinear kernels as they run, in a CUDA graph.

The BitLinear kernels (plugins/bitlinear_kernels.py) run inside CUDA graphs, chained by PDL (plugins/pdl.py), where
what costs is a kernel's latency and how much of it overlaps the previous kernel's tail. Triton's default timing
(one launch at a time, L2 flushed before each) ranked their candidates differently from how they run there: on an
H200 (4096 x 4096, timed as benchmarks/bitlinear_kernels.py times them) it picked a GEMV config that took 3.9 us
per call over one that took 3.1 us, and a 16-token GEMM config that took 12.4 us over one that took 8.0 us. With
graph timing the autotuner times each candidate as a CUDA graph of back-to-back calls
(triton.testing.do_bench_cudagraph) with the same launch options (PDL) as the real calls, the weights staying in
L2; there it picked the 3.1 and 8.1 us configs.

The decode kernels (plugins/decode_kernels.py) keep Triton's default timing (graph=False): graph timing made a
bGPT-base patch 2-3% faster but sigma-GPT's burst passes 1.5x slower
(benchmarks/results/h200-sigma-gpt-autotune-timing.json).

Env BYTEDEPLOY_AUTOTUNE_GRAPH=0 turns graph timing off everywhere (read at import).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.testing
except ImportError:
    triton = None

GRAPH_TIMING = os.environ.get("BYTEDEPLOY_AUTOTUNE_GRAPH", "1") != "0"
GRAPH_REP_MS = 10  # each candidate's graph holds about this many milliseconds of calls (Triton's default: 100)


def graph_timing(kernel_call, quantiles):
    """Milliseconds per call of kernel_call, timed as a CUDA graph of about GRAPH_REP_MS of back-to-back calls."""
    return triton.testing.do_bench_cudagraph(kernel_call, rep=GRAPH_REP_MS, quantiles=quantiles)


def autotune(configs: list, key: list[str], prune, graph: bool = True):
    """triton.autotune over configs, keyed on key, with the early prune `prune`; timed in a CUDA graph where graph
    and GRAPH_TIMING are on, else with Triton's default timing."""
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune},
                           do_bench=graph_timing if graph and GRAPH_TIMING else None)
