"""A kernel's tail, run by whichever of its programs finishes last: one launch where two would chain.

An autoregressive token runs ~20 kernels a layer one after another, and a kernel of one program that reads what a
wide kernel just wrote (routing after the router's product, say) costs a launch boundary for microseconds of
work. Here every program of the wide kernel, after its stores, adds one to a counter in device memory; the program
that sees the count reach the grid's size knows every other program's stores have landed, runs the tail, and sets
the counter back to 0 for the next launch.

The counter belongs to the call site (`Router.counter`, say): two kernels that could run at the same time, on
two streams, must not share one. Kernels on one stream may: a launch starts counting only after the one before
has finished (a PDL kernel counts after `wait_for_inputs`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def last_program(counter_ptr, programs):
    """Whether this program is the last of `programs` to get here; every program calls it once, after its stores.
    The tail reads the others' output with `.cg` loads (from L2: this SM's L1 may hold stale lines)."""
    tl.debug_barrier()  # every thread of this program has issued its stores before the release below
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = done == programs - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch
    tl.debug_barrier()
    return last
