"""Does a numba-parallel call, made the way vLLM's n-gram proposer makes it, leave the
target's GEMMs on one core? (CPU backend; what `chat_tradeoff.py --all-cores` works around.)

vLLM's CPU worker pins its main thread with GOMP_CPU_AFFINITY, so numba's default thread
count there is 1. The n-gram proposer calls `numba.set_num_threads(1)`, runs its parallel
function and "restores" that default. With numba's OpenMP threading layer this sets the
OpenMP thread count that vLLM's oneDNN GEMMs then use. This script runs one of the Qwen
1.5B target's MLP GEMMs (M rows x 1536 -> 8960, vLLM's `onednn_mm`) before and after such
a call, in a child process with the worker's OpenMP environment, once per numba threading
layer, and prints the milliseconds and the share of the GEMM's CPU time spent outside the
calling thread (0 = one core; contention from other processes does not change that share).

    python benchmarks/diagnostics/numba_openmp_check.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

WORKER_ENV = {"OMP_NUM_THREADS": "2", "GOMP_CPU_AFFINITY": "0 1"}  # what vLLM's CPU worker runs with here
LAYERS = ("omp", "workqueue")


def _gemm_figures(rows: int, reps: int) -> tuple[float, float]:
    """(ms per GEMM, share of its CPU time on other threads than this one)."""
    import torch
    from vllm import _custom_ops as ops

    weight = torch.randn(8960, 1536)
    handler = ops.create_onednn_mm(weight.t(), 32)
    x = torch.randn(rows, 1536)
    ops.onednn_mm(handler, x, None)
    wall0, process0, thread0 = time.perf_counter(), time.process_time(), time.thread_time()
    for _ in range(reps):
        ops.onednn_mm(handler, x, None)
    wall, process, thread = (time.perf_counter() - wall0, time.process_time() - process0,
                             time.thread_time() - thread0)
    return 1000 * wall / reps, max(0.0, 1 - thread / process)


def _child(rows: int, reps: int) -> None:
    before = _gemm_figures(rows, reps)  # OpenMP starts first and pins this thread, as in the worker
    import numba
    import numpy as np

    @numba.njit(parallel=True)
    def parallel_sum(values):
        total = 0.0
        for i in numba.prange(values.shape[0]):
            total += values[i]
        return total

    default = numba.get_num_threads()  # the proposer's "original" thread count
    numba.set_num_threads(1)
    parallel_sum(np.ones(16))
    numba.set_num_threads(default)
    after = _gemm_figures(rows, reps)
    print(f"{numba.threading_layer()} {default} {before[0]:.2f} {before[1]:.2f} {after[0]:.2f} {after[1]:.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=144, help="GEMM rows (16 requests x 9 verified tokens)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.rows, args.reps)
        return
    print(f"onednn_mm {args.rows}x1536 -> 8960, worker environment {WORKER_ENV}")
    print("numba layer | numba default threads | before: ms, CPU share off-thread | after the numba call: ms, share")
    for layer in LAYERS:
        env = dict(os.environ, **WORKER_ENV, NUMBA_THREADING_LAYER=layer)
        out = subprocess.run([sys.executable, __file__, "--child", "--rows", str(args.rows), "--reps", str(args.reps)],
                             env=env, capture_output=True, text=True, check=True).stdout.split()
        name, default, ms_before, share_before, ms_after, share_after = out[-6:]
        print(f"{name:>11} | {default:>21} | {ms_before:>6} ms, {share_before} | {ms_after:>6} ms, {share_after}")


if __name__ == "__main__":
    main()
