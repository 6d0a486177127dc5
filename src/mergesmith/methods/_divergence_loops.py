"""Arcee Fusion's row divergences KL(p ‖ q), p = softmax(x) + ε, q = softmax(y) + ε, as one compiled loop a row.

Why not torch's float32 formula (mergekit's): the softmaxes of weight rows are close to uniform, so the
divergence (~10⁻⁶) is a sum of terms ~10³ times larger that nearly cancel, and float32 rounding of p, q
and their ratio is of the size of the result: on the bench's 1B bf16 models torch's float32 rows were up
to 25% off the float64 value (median 2-3%). Its passes (two softmaxes, the adds, a divide, a log, a
multiply and a sum) also cost ~5-6 ns an entry on this machine.

The loop instead writes the divergence from per-row sums. With b = y − max y, u = (x − max x) − b,
e = exp(b), m = exp(u) − 1 (so that softmax(x) ∝ e·(1 + m)), E = Σe, M = Σe·m and R = 1 + M/E:

    log(softmax(x)/softmax(y)) = u − log R
    KL = Σe(1+m)u / (E + M) − log R + ε·(Σu − n·log R + (n·M − E·Σm) / (E + M))

The last group is the ε of p and q to first order in ε/softmax; the next order is of relative size
(ε/softmax)², below 10⁻⁶ where every softmax entry is at least 1000·ε (rows up to ~10⁵ near-uniform entries). m comes from the small-|u|
series on the exact float32 u, so the cancellation happens between float64 sums of accurate terms: the
result is within ~10⁻⁶ of the float64 formula (measured 1.4e-6 on the bench's 1B models, 8e-8 on rows with
larger deltas), in ~1.7-2.1 ns an entry on one thread.
Rows outside that domain (|u| > 1/8, a softmax entry below 1000·ε, y spread over more than 80, inf or NaN)
take `exact_divergence`, the float64 formula entry by entry.

The row sums are added in vector lanes (`lane_add`) and multiplies may fuse with adds, so a row's divergence
may differ in its last float64 bits between machines of different vector widths or without FMA; on one
machine it is the same run to run.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from mergesmith.methods._kernel_loops import widen

# `contract` lets LLVM fuse multiplies and adds (FMA, one rounding instead of two; the loop before its split
# took 3.1 ns an entry with it, 3.3-4.0 without); nothing else is reordered. The divergences need no
# bit-for-bit rounding order, only accuracy.
jit = njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
inline_jit = njit(nogil=True, inline="always", error_model="numpy", fastmath={"contract"})

SERIES_LIMIT = np.float32(0.125)  # |u| up to which exp(u) − 1 is the series below (error < 1e-10 of it)
SMALLEST_GROWTH = math.exp(-0.125)  # the least 1 + m = exp(u) within it
EXP_FLOOR = np.float32(-80.0)  # b down to which exp(b) is a normal float32
FIRST_ORDER_LIMIT = 1e-3  # ε / softmax entry up to which the ε terms to first order are exact enough
LN2_HI, LN2_LO = np.float32(0.693145751953125), np.float32(1.428606765330187045e-06)
LOG2E = np.float32(1.4426950408889634)
ONE, HALF = np.float32(1), np.float32(0.5)


@intrinsic
def lane_add(typingctx, total, x):
    """total + x for a float64 running sum that may be kept in vector lanes: the add alone is marked
    reassociable, so LLVM vectorises the sum (5x faster) while every other operation rounds as written."""
    if total != types.float64 or x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1], flags=("reassoc", "nsz"))

    return types.float64(total, x), codegen


@intrinsic
def bits_of(typingctx, x):
    """The int32 bit pattern of a float32."""
    if x != types.float32:
        return None
    return types.int32(x), lambda context, builder, signature, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def float_of(typingctx, bits):
    """The float32 of an int32 bit pattern."""
    if bits != types.int32:
        return None
    return types.float32(bits), lambda context, builder, signature, args: builder.bitcast(args[0], ir.FloatType())


@inline_jit
def order_key(bits):
    """An int32 ordered as the float32 of `bits` (negative floats have their magnitude bits flipped); its own inverse."""
    return np.int32(bits ^ np.int32(np.int32(bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@inline_jit
def half_order_key(bits):
    """`order_key` of a bf16 bit pattern, in int16: its own inverse too."""
    half = np.int16(bits)
    return np.int16(half ^ np.int16(np.int16(half >> np.int16(15)) & np.int16(0x7FFF)))


@inline_jit
def row_max(x):
    """The largest entry of a row (float32, or bf16 bit patterns), by its integer order key: an integer max
    vectorises, a float one did not (1.5 ns an entry against 0.07). bf16 rows take 16-bit keys, twice the
    lanes a vector (two rows' maxima 0.20 -> 0.10 ns an entry in cache; the whole divergence on a captured 1B
    chunk, alternating processes, best of seven: 1.14 -> 1.08). A positive NaN counts as the largest."""
    if x.itemsize == 2:
        half = np.int16(-32768)
        for c in range(x.size):
            half = max(half, half_order_key(x[c]))
        return float_of(np.int32(np.int32(np.uint16(half_order_key(half))) << np.int32(16)))
    top = np.int32(-2147483648)
    for c in range(x.size):
        top = max(top, order_key(bits_of(widen(x[c]))))
    return float_of(order_key(top))


@inline_jit
def exp_nonpositive(x):
    """exp(x) for EXP_FLOOR <= x <= 0 in float32, vectorisable (numba has no vector exp here): x = −k·ln 2 + r
    with |r| <= ln 2 / 2, a degree-6 series for exp(r) (error ~1e-7: only the weights of the sums) and 2^−k
    from its bits."""
    k = np.int32(x * -LOG2E + HALF)
    kf = np.float32(k)
    r = (x + kf * LN2_HI) + kf * LN2_LO
    p = np.float32(1 / 720)
    for coefficient in (np.float32(1 / 120), np.float32(1 / 24), np.float32(1 / 6), HALF, ONE, ONE):
        p = p * r + coefficient
    return p * float_of(np.int32(np.int32(np.int32(127) - k) << np.int32(23)))


@jit
def exact_divergence(x, y, eps):
    """The float64 formula entry by entry: softmaxes from log-sum-exps, then Σ p·log(p/q)."""
    top_x, top_y = np.float64(row_max(x)), np.float64(row_max(y))
    sum_x = sum_y = 0.0
    for c in range(x.size):
        sum_x += math.exp(np.float64(widen(x[c])) - top_x)
        sum_y += math.exp(np.float64(widen(y[c])) - top_y)
    shift_x, shift_y = top_x + math.log(sum_x), top_y + math.log(sum_y)
    kl = 0.0
    for c in range(x.size):
        p = math.exp(np.float64(widen(x[c])) - shift_x) + eps
        q = math.exp(np.float64(widen(y[c])) - shift_y) + eps
        kl += p * math.log(p / q)
    return kl


@jit
def row_divergence(x, y, eps, e_row, u_row, higher_row):
    """KL(softmax(x) + eps ‖ softmax(y) + eps) of one row (float32 or bf16 bit patterns), as a float64 >= 0, NaN
    where the formula gives NaN. e_row, u_row, higher_row: float32 scratch as long as the row. Two loops, one
    in float32 and one in float64, so that each vectorises at its own width: one loop mixing both took 2.61
    ns an entry against 1.72 (2048x2048 bf16, one thread)."""
    n = x.size
    top_x, top_y = row_max(x), row_max(y)
    top_u = np.int32(0)  # bit pattern of the largest |u| (NaN above inf): non-negative floats order as ints
    low_e = np.int32(0x7FFFFFFF)  # bit pattern of the smallest e (exp(EXP_FLOOR) where b is below it)
    for c in range(n):
        b = widen(y[c]) - top_y
        u = (widen(x[c]) - top_x) - b
        e = exp_nonpositive(max(b, EXP_FLOOR))
        top_u = max(top_u, np.int32(bits_of(u) & np.int32(0x7FFFFFFF)))
        low_e = min(low_e, bits_of(e))
        e_row[c], u_row[c] = e, u
        higher_row[c] = u * u * (HALF + u * (np.float32(1 / 6) + u * (np.float32(1 / 24) + u * (np.float32(1 / 120) + u * np.float32(1 / 720)))))
    sum_e = sum_em = sum_emu = sum_u = sum_m = 0.0
    for c in range(n):
        e64, u64 = np.float64(e_row[c]), np.float64(u_row[c])
        m64 = u64 + np.float64(higher_row[c])
        em = e64 * m64
        sum_e = lane_add(sum_e, e64)
        sum_em = lane_add(sum_em, em)
        sum_emu = lane_add(sum_emu, (e64 + em) * u64)
        sum_u = lane_add(sum_u, u64)
        sum_m = lane_add(sum_m, m64)
    total = sum_e + sum_em
    # inside the domain: every |u| <= 1/8 (then 1 + m >= exp(-1/8)), every softmax entry >= eps / FIRST_ORDER_LIMIT
    # (the smallest e with the smallest 1 + m bounds them). A b below EXP_FLOOR fails it, its e being exp(EXP_FLOOR)
    # ~1.8e-35 against sum_e >= 1: the 1e-30 keeps that so with eps 0.
    smallest = eps / FIRST_ORDER_LIMIT + 1e-30
    low = np.float64(float_of(low_e))
    if top_u > bits_of(SERIES_LIMIT) or low < smallest * sum_e or low * SMALLEST_GROWTH < smallest * total:
        kl = exact_divergence(x, y, eps)
    else:
        log_r = math.log1p(sum_em / sum_e)
        kl = sum_emu / total - log_r + eps * (sum_u - n * log_r + (n * sum_em - sum_e * sum_m) / total)
    if kl < 0.0:  # rounding below the true value, which is >= 0 (p and q have the same total); NaN stays
        kl = 0.0
    return kl


@jit
def row_divergences_into(x, y, eps, out):
    """out[r] = `row_divergence`(x[r], y[r], eps) for 2-D blocks of rows; out float32 or float64."""
    cols = x.shape[1]
    e_row, u_row, higher_row = np.empty(cols, np.float32), np.empty(cols, np.float32), np.empty(cols, np.float32)
    for r in range(x.shape[0]):
        out[r] = row_divergence(x[r], y[r], eps, e_row, u_row, higher_row)
