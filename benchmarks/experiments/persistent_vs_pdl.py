"""Why the decode path is a chain of PDL kernels and not one persistent kernel: the cost of each step, on a GPU.

    python -m bytedeploy.benchmarks.experiments.persistent_vs_pdl --out benchmarks/results/h200-persistent-vs-pdl.json

208 steps (a bGPT patch's byte decoder has 16 x 13 dependent kernels), each timed as a CUDA graph replay (median of
30) divided by 208: an empty kernel chained by programmatic dependent launch (plugins/pdl.py) vs a grid barrier in
one persistent kernel (an atomic counter, polled with acquire loads or with volatile loads); then 768 x 768 float32
GEMVs on distinct weights (the size of attention's c_proj), as a chain of decode_kernels.ln_linear calls vs phases
of one persistent kernel that loads the next phase's weights before its barrier. Every spin is bounded (fail_*
records whether one ran out).
"""
import argparse
import statistics
import types

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    raise SystemExit("persistent_vs_pdl needs Triton and a CUDA GPU") from None

from bytedeploy.bench import machine_name, write_json
from bytedeploy.plugins import decode_kernels as dk
from bytedeploy.plugins.pdl import launch_options, let_next_kernel_launch, wait_for_previous_kernel


@triton.jit
def empty_kernel(y_ptr, PDL: tl.constexpr):
    let_next_kernel_launch(PDL)
    wait_for_previous_kernel(PDL)
    if tl.program_id(0) == 0:
        tl.store(y_ptr, tl.load(y_ptr) + 1)


@triton.jit
def grid_barrier(counter_ptr, fail_ptr, target, POLL: tl.constexpr):
    """Every program: the counter += 1 (release), then wait until it reaches target (acquire); at most 2,000,000
    polls, else fail_ptr = 1. Thread-0 scalar atomics between two bar.syncs, as a cooperative grid sync does."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    spins = 0
    if POLL:
        seen = tl.load(counter_ptr, volatile=True)
        while (seen < target) & (spins < 2000000):
            seen = tl.load(counter_ptr, volatile=True)
            spins += 1
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    else:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        while (seen < target) & (spins < 2000000):
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            spins += 1
    if spins >= 2000000:
        tl.store(fail_ptr, 1)
    tl.debug_barrier()


@triton.jit
def grid_exit(counter_ptr, exit_ptr, G):
    """The last of the G programs to leave sets both counters back to zero for the next launch."""
    if tl.atomic_add(exit_ptr, 1, sem="acq_rel", scope="gpu") == G - 1:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(exit_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def barriers_kernel(counter_ptr, exit_ptr, fail_ptr, n_barriers, G, POLL: tl.constexpr):
    for i in range(n_barriers):
        grid_barrier(counter_ptr, fail_ptr, (i + 1) * G, POLL)
    grid_exit(counter_ptr, exit_ptr, G)


@triton.jit
def persistent_gemv(w_ptr, x_ptr, counter_ptr, exit_ptr, fail_ptr, n_phases, G, N, K: tl.constexpr, R: tl.constexpr,
                    BLOCK_K: tl.constexpr, POLL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    w = tl.load(w_ptr + rows[:, None] * K + offs_k[None, :], mask=kmask[None, :], other=0.0)
    for p in range(n_phases):
        x = tl.load(x_ptr + (p % 2) * K + offs_k, mask=kmask, other=0.0, cache_modifier=".cg")
        y = tl.sum(w * x[None, :], axis=1)
        nxt = w_ptr + (p + 1).to(tl.int64) * N * K
        w = tl.load(nxt + rows[:, None] * K + offs_k[None, :], mask=kmask[None, :] & (p + 1 < n_phases), other=0.0)
        tl.store(x_ptr + ((p + 1) % 2) * K + rows, y * 0.01 + 1.0)
        grid_barrier(counter_ptr, fail_ptr, (p + 1) * G, POLL)
    grid_exit(counter_ptr, exit_ptr, G)


def graph_ms(fn, reps=30):
    """Median milliseconds of a CUDA graph of fn (captured after one warm-up call on a side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    t = []
    for _ in range(reps):
        ev[0].record()
        g.replay()
        ev[1].record()
        ev[1].synchronize()
        t.append(ev[0].elapsed_time(ev[1]))
    return statistics.median(t)


def main(out):
    dev = torch.device("cuda")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    P = 208
    res = {"gpu": torch.cuda.get_device_name(0), "machine": machine_name(), "sms": n_sm, "phases": P}
    y = torch.zeros(1, device=dev)
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    exit_ = torch.zeros(1, dtype=torch.int32, device=dev)
    fail = torch.zeros(1, dtype=torch.int32, device=dev)
    for grid, nw in ((132, 4), (192, 4), (132, 8)):
        def chain(grid=grid, nw=nw):
            for _ in range(P):
                empty_kernel[(grid,)](y, num_warps=nw, **launch_options(dev))
        res[f"empty_pdl_chain_g{grid}_w{nw}_us"] = graph_ms(chain) * 1e3 / P
    for poll in (False, True):
        for grid in (n_sm, 2 * n_sm, 96):
            ms = graph_ms(lambda grid=grid, poll=poll: barriers_kernel[(grid,)](counter, exit_, fail, P, grid,
                                                                                POLL=poll, num_warps=4))
            res[f"barrier_g{grid}_poll{int(poll)}_us"] = ms * 1e3 / P
            res[f"fail_after_barrier_g{grid}_poll{int(poll)}"] = int(fail.item())
            print(res, flush=True)
    N = K = 768
    weights = torch.randn(P + 1, N, K, device=dev) * 0.02
    x = torch.ones(2, K, device=dev)
    linears = [types.SimpleNamespace(weight=weights[i], bias=None) for i in range(P)]
    xin = torch.ones(1, K, device=dev)

    def gemv_chain():
        h = xin
        for lin in linears:
            h = dk.ln_linear(h, None, lin)
    dk.ln_linear(xin, None, linears[0])
    res["ln_linear_chain_768_us"] = graph_ms(gemv_chain) * 1e3 / P
    res["ln_linear_pick"] = [str(c) for c in dk._ln_linear_tuned.cache.values()]
    for R, nw in ((4, 4), (8, 4), (8, 8), (16, 8)):
        G = N // R
        for poll in (False, True):
            ms = graph_ms(lambda G=G, R=R, nw=nw, poll=poll: persistent_gemv[(G,)](
                weights, x, counter, exit_, fail, P, G, N, K=K, R=R, BLOCK_K=1024, POLL=poll, num_warps=nw))
            res[f"persistent_gemv_R{R}_w{nw}_poll{int(poll)}_us"] = ms * 1e3 / P
            res[f"fail_gemv_R{R}_w{nw}_poll{int(poll)}"] = int(fail.item())
            print(res, flush=True)
    # numerics of one persistent pass vs torch
    x.fill_(1.0)
    persistent_gemv[(N // 8,)](weights, x, counter, exit_, fail, 3, N // 8, N, K=K, R=8, BLOCK_K=1024, POLL=True,
                               num_warps=4)
    h = torch.ones(K, device=dev)
    for i in range(3):
        h = weights[i] @ h * 0.01 + 1.0
    res["persistent_gemv_max_err"] = float((x[1] - h).abs().max())
    print(res)
    write_json(res, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    if not torch.cuda.is_available():
        raise SystemExit("persistent_vs_pdl needs a CUDA GPU")
    main(parser.parse_args().out)
