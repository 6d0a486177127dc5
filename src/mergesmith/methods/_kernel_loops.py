"""The compiled loops themselves (numba), imported by `_kernels` only when they are wanted; see `_kernels` for
what they are for, the numerics they keep and how to write them.

They are module-level functions, not closures: numba keys a cached closure by its free variables, and a
dispatcher captured in one (a loop calling another loop) pickles differently in every process, so such a
loop was compiled anew by every merge (0.5-0.6 s each for consensus_into and DELLA's ranked_keep).
"""

import numpy as np
from llvmlite import ir
from numba import literal_unroll, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from mergesmith.methods._kernels import KEEP_BLOCK, LANES

# fastmath stays off: each float operation rounds as written, in this order. cache: compiled once per machine
# (next to this file, or numba's user cache when that is read-only).
jit = njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")


@intrinsic
def widen(typingctx, x):
    """The float32 value of an input entry: a float32 as it is, a bfloat16 bit pattern (uint16) shifted into
    the upper half of a float32, which is exact and is what torch's conversion does, NaN payloads included.
    The loops read bf16 inputs (as uint16 arrays) this way instead of a float32 copy made by torch first."""
    if x == types.float32:
        return types.float32(x), lambda context, builder, signature, args: args[0]
    if x == types.uint16:
        def codegen(context, builder, signature, args):
            upper = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(upper, ir.FloatType())

        return types.float32(x), codegen
    return None


@intrinsic
def narrow(typingctx, x, out):
    """The float32 x as an entry of the output array `out` holds it: as it is in a float32 output; in a bf16
    one (uint16 bit patterns) rounded to nearest, ties to even, as PyTorch's conversion rounds, a NaN
    becoming the quiet NaN 0x7FC0. A loop that stores its results through this writes a bf16 output
    directly, without a float32 chunk and a rounding pass over it (`OutputChunks.direct`)."""
    if x != types.float32 or not isinstance(out, types.Array):
        return None
    if out.dtype == types.float32:
        return types.float32(x, out), lambda context, builder, signature, args: args[0]
    if out.dtype != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def const(value):
            return ir.Constant(i32, value)

        b = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(b, const(16)), const(1))
        rounded = builder.trunc(builder.lshr(builder.add(builder.add(b, const(0x7FFF)), odd), const(16)), ir.IntType(16))
        nan = builder.icmp_unsigned(">", builder.and_(b, const(0x7FFFFFFF)), const(0x7F800000))
        return builder.select(nan, ir.Constant(ir.IntType(16), 0x7FC0), rounded)

    return types.uint16(x, out), codegen


@jit
def position_split(split, n):
    """A split position (`Cut.bounds`: any int64, negative or past the end) as an int32 in [0, n], which
    tests `i < split` the same way for every chunk position i < n, in int32: an int64 compare made the
    loops keep their positions as int64 vectors (60 vpcmpgtq in `pair_delta_merge_into`'s copies; no time
    change measured there, where the float tests' port pressure decides, but half the registers)."""
    return np.int32(min(max(split, 0), n))


@jit
def distance_bounds(bounds, n):
    """(ge, gt, split) for `far_apart` in a chunk of n entries (`position_split`)."""
    ge, gt, split = bounds
    return ge, gt, position_split(split, n)


@jit
def delta_bounds(bounds, n):
    """A keep rule's (keep_ge, keep_gt, keep_split, drop_ge, drop_gt, drop_split) for `kept_delta` in a chunk
    of n entries (`position_split`)."""
    keep_ge, keep_gt, keep_split, drop_ge, drop_gt, drop_split = bounds
    return keep_ge, keep_gt, position_split(keep_split, n), drop_ge, drop_gt, position_split(drop_split, n)


@jit
def far_apart(x, y, i, bounds):
    """Whether |x - y| exceeds bounds = (ge, gt, split) at chunk position i: ge before the split, gt from it on
    (`Cut.bounds`, split from `distance_bounds`); a NaN distance counts as apart. `cut_mask`'s test, for loops
    that select as they go."""
    ge, gt, split = bounds
    return not abs(x - y) <= (ge if np.int32(i) < split else gt)


@jit
def kept_delta(d, i, bounds, stored_keeps, scale, weight):
    """((d if kept else 0) * scale) * weight for the delta d at chunk position i (see `weighted_delta`; bounds:
    (keep_ge, keep_gt, keep_split, drop_ge, drop_gt, drop_split), splits from `delta_bounds`). Scalars only:
    a helper taking an array, called per entry, cost ~3 ns an entry in reference counting."""
    keep_ge, keep_gt, keep_split, drop_ge, drop_gt, drop_split = bounds
    a = abs(d)
    position = np.int32(i)
    kb = keep_ge if position < keep_split else keep_gt
    xb = drop_ge if position < drop_split else drop_gt
    keep = (not a <= kb) & (not a > xb) & stored_keeps
    return ((d if keep else np.float32(0)) * scale) * weight


@jit
def weighted_delta(model, base, keep_ge, keep_gt, keep_split, drop_ge, drop_gt, drop_split, stored, scale, weight, out):
    """out = ((model - base) if kept else 0) * scale * weight. Kept: magnitude above the keep bound and not
    above the drop bound (each bound is `ge` before its split position and `gt` from it on: how a Cut
    breaks ties by position), and stored[i] != 0 when `stored` is not empty. A NaN is kept, as the torch
    path's mask multiply keeps it. (Two loops, so that neither tests whether there is a stored mask.)"""
    bounds = delta_bounds((keep_ge, keep_gt, keep_split, drop_ge, drop_gt, drop_split), out.size)
    if stored.size == 0:
        for i in range(out.size):
            out[i] = kept_delta(widen(model[i]) - widen(base[i]), i, bounds, True, scale, weight)
    else:
        for i in range(out.size):
            out[i] = kept_delta(widen(model[i]) - widen(base[i]), i, bounds, stored[i] != 0, scale, weight)


@jit
def magnitudes_into(model, base, out):
    """out = |model - base|: a task vector's magnitudes, in one pass over the inputs as stored."""
    for i in range(out.size):
        out[i] = abs(widen(model[i]) - widen(base[i]))


@jit
def scaled_magnitudes_into(model, base, scales, out):
    """out[r, c] = |model[r, c] - base[r, c]| * scales[r] for 2-D blocks of rows: Arcee Fusion's importances
    from the inputs as stored and the rows' KL divergences, in one pass (torch's subtract, abs and multiply
    on float32 copies took three). Returns how many came out NaN (the selection cannot order those)."""
    rows, cols = out.shape
    nans = 0
    for r in range(rows):
        m, b, o, s = model[r], base[r], out[r], scales[r]
        row_nans = np.int32(0)
        for c in range(cols):
            a = abs(widen(m[c]) - widen(b[c])) * s
            o[c] = a
            row_nans = np.int32(row_nans + np.int32(a != a))  # int32 counters: see `window_count`
        nans += row_nans
    return nans


@jit
def choose_scaled_into(other, base, scales, threshold, out):
    """out[r, c] = other[r, c] where |other[r, c] - base[r, c]| * scales[r] >= threshold, else base[r, c]:
    Arcee Fusion's output from the inputs and the rows' KL divergences, its importances computed again
    entry by entry (the same float operations as `scaled_magnitudes_into`) instead of read from memory.
    A NaN importance keeps the base, as the torch comparison does."""
    rows, cols = out.shape
    for r in range(rows):
        m, b, o, s = other[r], base[r], out[r], scales[r]
        for c in range(cols):
            x, y = widen(m[c]), widen(b[c])
            o[c] = narrow(x if abs(x - y) * s >= threshold else y, o)


@jit
def sum_rows(deltas, n, out):
    """out[:n] = the rows of `deltas` (first n columns) added from the first to the last."""
    first = deltas[0]
    for i in range(n):
        out[i] = first[i]
    for j in range(1, deltas.shape[0]):
        row = deltas[j]
        for i in range(n):
            out[i] += row[i]


@jit
def welford_variance_into(deltas, n, mean, m2, out):
    """out[:n] = the population variance across the rows of `deltas` (their first n columns): Welford's update
    in float64 from the first row to the last, divided by the row count and rounded once to float32. These
    are the float64 operations of `_sparsify.variance_across`'s torch loop, entry by entry in its order
    (mergekit's torch.var bits). Blocks of `mean.size` entries, with the float64 scratch `mean` and `m2` in
    L1, so that each update runs across a block's entries in vectors (the division by the count as well;
    by a power of two, a multiplication)."""
    rows = deltas.shape[0]
    block = mean.size
    for start in range(0, n, block):
        m = min(block, n - start)
        means, sums, first = mean[:m], m2[:m], deltas[0, start:start + m]
        for i in range(m):
            means[i] = np.float64(first[i])
            sums[i] = 0.0
        for j in range(1, rows):
            row = deltas[j, start:start + m]
            count = np.float64(j + 1)
            if exact_reciprocal(j + 1):
                for i in range(m):
                    x = np.float64(row[i])
                    step = x - means[i]
                    means[i] += step * (1.0 / count)
                    sums[i] += step * (x - means[i])
            else:
                for i in range(m):
                    x = np.float64(row[i])
                    step = x - means[i]
                    means[i] += step / count
                    sums[i] += step * (x - means[i])
        o = out[start:start + m]
        if exact_reciprocal(rows):
            for i in range(m):
                o[i] = np.float32(sums[i] * (1.0 / rows))
        else:
            for i in range(m):
                o[i] = np.float32(sums[i] / rows)


@jit
def variance_into(models, base, rows, mean, m2, out):
    """`welford_variance_into` on the task vectors d = model - base of any number of models (a tuple of their
    chunks, unrolled over), made as float32 rows a block of `rows.shape[1]` entries at a time, so that they
    stay in L1 (rows of a whole chunk: 3.2 of SCE's 5.3 s of thread time for the variance of four 1B models)."""
    n = out.size
    block = rows.shape[1]
    for start in range(0, n, block):
        m = min(block, n - start)
        task_vector_block(models, base, start, m, rows)
        welford_variance_into(rows, m, mean, m2, out[start:start + m])


@jit
def task_vector_block(models, base, start, m, rows):
    """rows[j, :m] = model j's task vector d = model - base over the entries [start, start + m), float32 as
    torch subtracts them: the block rows of the loops for any number of models (`models`: a tuple of their
    chunks, unrolled over, so their dtypes may differ)."""
    below = base[start:start + m]
    j = 0
    for model in literal_unroll(models):
        row, chunk = rows[j], model[start:start + m]
        for i in range(m):
            row[i] = widen(chunk[i]) - widen(below[i])
        j += 1


@jit
def exact_reciprocal(count):
    """Whether dividing by `count` is multiplying by 1 / count, bit for bit: for a power of two both are the
    same real number, correctly rounded once (vector division costs several times a multiplication)."""
    return count & (count - 1) == 0


@jit
def contribution_into(model, base, epsilon, out):
    """out = δ·[|δ| > epsilon] with δ = model - base: RAM's masked task vector, a multiply by the 0/1 flag as
    in the torch path (a NaN δ stays NaN). The flag is |out| > epsilon again, which the loops below use."""
    zero, one = np.float32(0), np.float32(1)
    for i in range(out.size):
        d = widen(model[i]) - widen(base[i])
        out[i] = d * (one if abs(d) > epsilon else zero)


@jit
def contributor_count_into(deltas, n, epsilon, counts):
    """counts[:n] = how many rows of `deltas` (masked task vectors) contribute to each entry, as floats."""
    zero, one = np.float32(0), np.float32(1)
    for i in range(n):
        counts[i] = zero
    for j in range(deltas.shape[0]):
        row = deltas[j]
        for i in range(n):
            counts[i] += one if abs(row[i]) > epsilon else zero


@jit
def contributor_tallies(deltas, n, epsilon, counts, tallies):
    """tallies[j] += (entries where row j contributes, those where no other row does): RAM+'s counts.
    `counts`: scratch of length >= n."""
    one = np.float32(1)
    contributor_count_into(deltas, n, epsilon, counts)
    for j in range(deltas.shape[0]):
        row = deltas[j]
        contributing = unique = np.int32(0)  # int32 counters (chunks below 2^31 entries): see `window_count`
        for i in range(n):
            flag = abs(row[i]) > epsilon
            contributing = np.int32(contributing + np.int32(flag))
            unique = np.int32(unique + np.int32(flag & (counts[i] == one)))
        tallies[j, 0] += contributing
        tallies[j, 1] += unique


@jit
def pair_tallies(model0, model1, base, epsilon, tallies):
    """`contributor_tallies` for two models straight from the inputs as stored, without writing the masked
    task vectors: tallies[j] += (entries where model j contributes, those where the other does not)."""
    _tallies_loop(model0, model1, model1, base, epsilon, tallies, False)


@jit
def triple_tallies(model0, model1, model2, base, epsilon, tallies):
    """`pair_tallies` for three models: tallies[j] += (entries where model j contributes, those where no other
    does)."""
    _tallies_loop(model0, model1, model2, base, epsilon, tallies, True)


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", inline="always")
def _tallies_loop(model0, model1, model2, base, epsilon, tallies, third):
    """The loop of `pair_tallies` and `triple_tallies`, inlined where it is called so that the constant
    `third` folds away (without it, `model2` is not read)."""
    c0 = c1 = c2 = u0 = u1 = u2 = np.int32(0)  # int32 counters (chunks below 2^31 entries): see `window_count`
    for i in range(base.size):
        x = widen(base[i])
        f0, f1 = abs(widen(model0[i]) - x) > epsilon, abs(widen(model1[i]) - x) > epsilon
        f2 = (abs(widen(model2[i]) - x) > epsilon) if third else False
        c0, c1, c2 = np.int32(c0 + np.int32(f0)), np.int32(c1 + np.int32(f1)), np.int32(c2 + np.int32(f2))
        u0 = np.int32(u0 + np.int32(f0 & (not f1) & (not f2)))
        u1 = np.int32(u1 + np.int32(f1 & (not f0) & (not f2)))
        u2 = np.int32(u2 + np.int32(f2 & (not f0) & (not f1)))
    tallies[0, 0] += c0
    tallies[0, 1] += u0
    tallies[1, 0] += c1
    tallies[1, 1] += u1
    if third:
        tallies[2, 0] += c2
        tallies[2, 1] += u2


@jit
def ram_combine_into(deltas, n, epsilon, lams, amplify, base, counts, amplified, out):
    """RAM's merge of the masked task vectors (rows of `deltas`): out = base + Σ δⱼ / max(c, 1), c the
    contributor count; with `amplify` (RAM+), base + Σ λⱼ·δⱼ where c = 1 instead. The sums run in row order,
    as the torch path adds. `counts`, `amplified`: scratch of length >= n."""
    zero, one = np.float32(0), np.float32(1)
    contributor_count_into(deltas, n, epsilon, counts)
    sum_rows(deltas, n, out)
    if amplify:
        first = deltas[0]
        for i in range(n):
            amplified[i] = zero + first[i] * lams[0]
        for j in range(1, deltas.shape[0]):
            row, lam = deltas[j], lams[j]
            for i in range(n):
                amplified[i] += row[i] * lam
        for i in range(n):
            c = counts[i]
            out[i] = (amplified[i] if c == one else out[i] / max(c, one)) + widen(base[i])
    else:
        for i in range(n):
            out[i] = out[i] / max(counts[i], one) + widen(base[i])


@jit
def ram_rows_merge_into(models, base, epsilon, lams, amplify, rows, counts, amplified, out):
    """`ram_combine_into` a block of `rows.shape[1]` entries at a time, on the block's masked task vectors
    (`contribution_rows`) in rows that stay in cache, where rows of whole 2^18-entry chunks (1 MB a model)
    spilled out of it (1B RAM+, four fine-tunes: writing and reading them back was half its thread time).
    The same float operations entry by entry. `counts`, `amplified`: scratch of the block's length; `out`:
    float32."""
    block = rows.shape[1]
    for start in range(0, out.size, block):
        m = contribution_rows(models, base, epsilon, start, rows)
        ram_combine_into(rows, m, epsilon, lams, amplify, base[start : start + m], counts, amplified, out[start : start + m])


@jit
def ram_rows_tallies(models, base, epsilon, rows, counts, tallies):
    """`contributor_tallies` a block of `rows.shape[1]` entries at a time (as `ram_rows_merge_into` merges):
    RAM+'s counts for four or more models."""
    block = rows.shape[1]
    for start in range(0, base.size, block):
        m = contribution_rows(models, base, epsilon, start, rows)
        contributor_tallies(rows, m, epsilon, counts, tallies)


@jit
def contribution_rows(models, base, epsilon, start, rows):
    """rows[j, :m] = model j's masked task vector (`contribution_into`) on the block of m = min(block, n -
    start) entries from `start`; returns m. Unrolled over the models (a tuple; their dtypes may differ)."""
    m = min(rows.shape[1], base.size - start)
    below = base[start : start + m]
    j = 0
    for model in literal_unroll(models):
        contribution_into(model[start : start + m], below, epsilon, rows[j, :m])
        j += 1
    return m


@jit
def elect_into(deltas, n, by_count, votes):
    """votes[:n] = the majority sign (+1 or -1) of the rows of `deltas`: the sign of their sum (or of the sum of
    their signs, `by_count`); >= 0 elects +."""
    zero, one = np.float32(0), np.float32(1)
    if by_count:
        first = deltas[0]
        for i in range(n):
            votes[i] = np.sign(first[i])
        for j in range(1, deltas.shape[0]):
            row = deltas[j]
            for i in range(n):
                votes[i] += np.sign(row[i])
    else:
        sum_rows(deltas, n, votes)
    for i in range(n):
        votes[i] = one if votes[i] >= zero else -one


@jit
def agreeing_sums_into(deltas, n, weights, votes, weigh, out, divisor):
    """out = Σ the deltas that carry the majority sign `votes` (each times its model's weight first, `weigh`),
    divisor = Σ the weights of the models that carry it; zeros never agree."""
    zero, one = np.float32(0), np.float32(1)
    for i in range(n):
        out[i] = zero
        divisor[i] = zero
    for j in range(deltas.shape[0]):
        row = deltas[j]
        w = weights[j]
        factor = w if weigh else one
        for i in range(n):
            agree = row[i] * votes[i] > zero
            out[i] += row[i] * factor if agree else zero
            divisor[i] += w if agree else zero


@jit
def pair_agreeing(d0, d1, w0, w1, weigh, normalize, floor):
    """The disjoint merge of one entry's two deltas, elected by the sign of their sum (see
    `pair_delta_merge_into`): Σ agreeing deltas (times their weights when weigh) over the divisor."""
    zero, one = np.float32(0), np.float32(1)
    vote = one if d0 + d1 >= zero else -one
    agree0, agree1 = d0 * vote > zero, d1 * vote > zero
    f0, f1 = (w0, w1) if weigh else (one, one)
    total = (zero + (d0 * f0 if agree0 else zero)) + (d1 * f1 if agree1 else zero)
    divisor = (zero + (w0 if agree0 else zero)) + (w1 if agree1 else zero)
    if weigh:
        return total / max(divisor, floor)
    if normalize:
        return total / (divisor if divisor != zero else one)
    return total


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", inline="always")
def _pair_delta_loop(model0, model1, base, bounds0, bounds1, stored0, stored1, apart, factors, weights, elect, weigh,
                     normalize, cuts, divisor, scale, out):
    """`pair_delta_merge_into`'s loop, inlined by numba where it is called, so that constant flags fold away.
    Without `cuts` every magnitude passes both models' bounds, and the stored masks alone decide."""
    r0, f0, r1, f1 = factors[0], factors[1], factors[2], factors[3]
    w0, w1 = weights[0], weights[1]
    every0, every1 = stored0.size == 0, stored1.size == 0
    n = out.size
    bounds0, bounds1, apart = delta_bounds(bounds0, n), delta_bounds(bounds1, n), distance_bounds(apart, n)
    for i in range(out.size):
        x, y0, y1 = widen(base[i]), widen(model0[i]), widen(model1[i])
        selected = far_apart(y0, y1, i, apart) if weigh else True  # SCE's selection only
        keeps0 = selected & (every0 or stored0[i] != 0)
        keeps1 = selected & (every1 or stored1[i] != 0)
        if cuts:
            d0 = kept_delta(y0 - x, i, bounds0, keeps0, r0, f0)
            d1 = kept_delta(y1 - x, i, bounds1, keeps1, r1, f1)
        else:  # `kept_delta` with bounds that pass every magnitude, NaN included
            d0 = ((y0 - x if keeps0 else np.float32(0)) * r0) * f0
            d1 = ((y1 - x if keeps1 else np.float32(0)) * r1) * f1
        if elect:
            total = pair_agreeing(d0, d1, w0, w1, weigh, normalize, divisor)
        else:
            total = d0 + d1
            if normalize:
                total = total / divisor
        out[i] = narrow(total * scale + x, out)


@jit
def pair_delta_merge_into(model0, model1, base, bounds0, bounds1, stored0, stored1, apart, factors, weights, how, divisor,
                          scale, out):
    """Two models' masked deltas combined into the output in one pass that keeps them in registers: the float
    operations of `weighted_delta` on each model, then of `consensus_into` or `weighted_consensus_into` (two
    rows) or `sum_into`, bit for bit, without writing two float32 deltas and reading them back (1B, two
    models, TIES: 2.0 against 1.5 ns an output entry, inputs from memory).

    bounds0/1: each model's (keep_ge, keep_gt, keep_split, drop_ge, drop_gt, drop_split); apart (with weigh
    only: SCE's selection): bounds on the models' distance, (ge, gt, split) as `cut_mask` takes them, both
    deltas masked where the distance is not above its bound ((-inf, -inf, 0) selects every entry; a test the
    other modes skip: 0.13 ns an entry); factors: (rescale0, weight0, rescale1, weight1), the deltas' factors;
    weights: the election's (w0, w1); how: (elect, weigh, normalize): elect by the sign of the sum and merge
    the agreeing deltas (weigh: SCE's weighted merge over the agreeing weights floored at `divisor`), else sum
    them (divided by `divisor` when normalize). `out`: float32, or a bf16 output's bit patterns (`narrow`).
    One copy of the loop per combination, each with its flags constant (a loop testing them per entry: TIES
    1.75 against 1.1 ns an entry). SCE, DARE and DELLA have no magnitude cuts (bounds that pass everything):
    their copies skip the bounds' tests (16 of a step's ~65 vector instructions)."""
    elect, weigh, normalize = how
    cuts = not (passes_every_magnitude(bounds0) and passes_every_magnitude(bounds1))
    m0, m1, b, k0, k1, s0, s1, a, f, w = model0, model1, base, bounds0, bounds1, stored0, stored1, apart, factors, weights
    if elect and weigh and cuts:
        _pair_delta_loop(m0, m1, b, k0, k1, s0, s1, a, f, w, True, True, True, True, divisor, scale, out)
    elif elect and weigh:  # SCE
        _pair_delta_loop(m0, m1, b, k0, k1, s0, s1, a, f, w, True, True, True, False, divisor, scale, out)
    elif elect and normalize and cuts:
        _pair_delta_loop(m0, m1, b, k0, k1, s0, s1, a, f, w, True, False, True, True, divisor, scale, out)
    elif elect and normalize:  # DARE-TIES, DELLA
        _pair_delta_loop(m0, m1, b, k0, k1, s0, s1, a, f, w, True, False, True, False, divisor, scale, out)
    elif elect:
        _pair_delta_loop(m0, m1, b, k0, k1, s0, s1, a, f, w, True, False, False, True, divisor, scale, out)
    elif normalize:
        _pair_delta_loop(m0, m1, b, k0, k1, s0, s1, a, f, w, False, False, True, True, divisor, scale, out)
    elif cuts:
        _pair_delta_loop(m0, m1, b, k0, k1, s0, s1, a, f, w, False, False, False, True, divisor, scale, out)
    else:  # DARE and DELLA linear
        _pair_delta_loop(m0, m1, b, k0, k1, s0, s1, a, f, w, False, False, False, False, divisor, scale, out)


@jit
def rows_merge_into(models, base, limits, splits, stored, factors, weights, how, divisor, scale, rows, scratch, out):
    """Any number of models' masked deltas merged into the output a block of entries at a time: per block,
    `weighted_delta` writes each model's row, then `consensus_into` (elect) or `sum_into` merges them, the
    same float operations bit for bit as on rows of a whole chunk, but on rows of `rows.shape[1]` entries
    that stay in cache (four models' rows of a 2^18-entry chunk, 4 MB, spill out of it: 1B TIES, four
    fine-tunes, 6.4 s of thread time in the rows' loops).

    models: a tuple of the models' chunks as the loops read them (their dtypes may differ: the loop is
    unrolled over them); stored: a tuple of uint8 stored masks (empty: none), one a model; limits[j]:
    model j's (keep_ge, keep_gt, drop_ge, drop_gt) and splits[j] its (keep_split, drop_split), as
    `Cut.bounds` gives them for the chunk; factors[j]: its (rescale, weight); weights: the election's;
    how: (elect, weigh, by_count, normalize), weigh for SCE's `weighted_consensus_into`; divisor: the sum's
    (without election) or SCE's floor; scratch: float32 (3, block) for the votes, the divisors and the
    block's result; `out`: float32, or a bf16 output's bit patterns."""
    elect, weigh, by_count, normalize = how
    n = out.size
    block = rows.shape[1]
    votes, divisors, merged = scratch[0], scratch[1], scratch[2]
    for start in range(0, n, block):
        m = min(block, n - start)
        end = start + m
        below = base[start:end]
        j = 0
        for model in literal_unroll(models):
            mask = stored[j]
            weighted_delta(model[start:end], below, limits[j, 0], limits[j, 1], splits[j, 0] - start, limits[j, 2],
                           limits[j, 3], splits[j, 1] - start, mask[start:end] if mask.size else mask, factors[j, 0],
                           factors[j, 1], rows[j, :m])
            j += 1
        if weigh:
            weighted_consensus_into(rows, m, weights, by_count, divisor, below, votes, divisors, merged)
        elif elect:
            consensus_into(rows, m, weights, by_count, normalize, scale, below, votes, divisors, merged)
        else:
            sum_into(rows, m, normalize, divisor, scale, below, merged)
        target = out[start:end]
        for i in range(m):
            target[i] = narrow(merged[i], target)


@jit
def passes_every_magnitude(bounds):
    """Whether a keep rule's bounds (`kept_delta`) keep every magnitude: nothing at or below -inf kept out,
    nothing above +inf dropped (NaN passes both tests)."""
    keep_ge, keep_gt, _, drop_ge, drop_gt, _ = bounds
    low, high = np.float32(-np.inf), np.float32(np.inf)
    return keep_ge == low and keep_gt == low and drop_ge == high and drop_gt == high


@jit
def consensus_into(deltas, n, weights, by_count, normalize, scale, base, votes, divisor, out):
    """TIES' elect and disjoint merge of the weighted deltas (rows of `deltas`, first n columns):
    out = base + scale * (Σ agreeing deltas) / (Σ agreeing weights, 0 -> 1, when normalize).
    `votes` and `divisor` are scratch of length >= n. (Two models elected by sum: `pair_delta_merge_into`.)"""
    zero, one = np.float32(0), np.float32(1)
    elect_into(deltas, n, by_count, votes)
    agreeing_sums_into(deltas, n, weights, votes, False, out, divisor)
    if normalize:
        for i in range(n):
            out[i] = out[i] / (divisor[i] if divisor[i] != zero else one)
    for i in range(n):
        out[i] = out[i] * scale + widen(base[i])


@jit
def weighted_consensus_into(deltas, n, weights, by_count, floor, base, votes, divisor, out):
    """SCE's merge of the (unweighted) deltas: out = base + Σ wᵢ·agreeing δᵢ / max(Σ agreeing wᵢ, floor), each
    product δᵢ·wᵢ rounded before it is added. `votes` and `divisor` are scratch of length >= n. (Two models
    elected by sum: `pair_delta_merge_into`.)"""
    elect_into(deltas, n, by_count, votes)
    agreeing_sums_into(deltas, n, weights, votes, True, out, divisor)
    for i in range(n):
        out[i] = out[i] / max(divisor[i], floor) + widen(base[i])


@jit
def cut_mask(x, y, ge, gt, split, out):
    """out[i] = 1 when |x[i] - y[i]| exceeds ge (i < split) or gt (i >= split), else 0 (see `Cut.bounds`):
    a cut's membership on the distance of two tensors (SCE's two-model variance)."""
    bounds = distance_bounds((ge, gt, split), out.size)
    for i in range(out.size):
        out[i] = far_apart(widen(x[i]), widen(y[i]), i, bounds)


@jit
def above_into(values, ge, gt, split, out):
    """out[i] = 1 when values[i] exceeds ge (i < split) or gt (i >= split), else 0 (a NaN exceeds nothing): a
    cut's membership on stored values (SCE's variance), as `Cut.mask_into` and a uint8 copy make it."""
    bound_ge, bound_gt, at = distance_bounds((ge, gt, split), out.size)
    for i in range(out.size):
        out[i] = values[i] > (bound_ge if np.int32(i) < at else bound_gt)


@jit
def sum_into(deltas, n, divide, divisor, scale, base, out):
    """out = base + scale * (Σ weighted deltas) / divisor (when divide): task arithmetic's combination.
    (Two models: `pair_delta_merge_into`.)"""
    sum_rows(deltas, n, out)
    if divide:
        for i in range(n):
            out[i] = out[i] / divisor
    for i in range(n):
        out[i] = out[i] * scale + widen(base[i])


@jit
def window_count(model, base, lo, hi):
    """(entries with |model - base| > hi, entries with lo <= |model - base| <= hi, non-zero entries) of a
    chunk of fewer than 2^31 entries.

    The counters are int32, each sum cast back (`np.int32(count + np.int32(test))`, which LLVM narrows to a
    32-bit add): numba widens integer sums to int64, and int64 counters hold four lanes a register and need
    a widening per test, which kept these loops from vectorising well (Arcee Fusion's three-window
    `windows_tally`: 1.43 -> 0.54 ns an entry, in cache, on this Zen 3 VM)."""
    above = inside = nonzero = np.int32(0)
    zero = np.float32(0)
    for i in range(model.size):
        a = abs(widen(model[i]) - widen(base[i]))
        above = np.int32(above + np.int32(a > hi))
        inside = np.int32(inside + np.int32((a >= lo) & (a <= hi)))
        nonzero = np.int32(nonzero + np.int32(a != zero))
    return above, inside, nonzero


@intrinsic
def trailing_zeros(typingctx, x):
    """The number of trailing zero bits of a uint64 (64 for 0): one instruction (LLVM's cttz)."""
    if x == types.uint64:
        def codegen(context, builder, signature, args):
            return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

        return types.uint64(x), codegen
    return None


@jit
def windows_gather(model, base, lows, highs, offset, values, positions, counts, flagged, flags, hits, magnitudes):
    """The selection windows' gather, all windows of a chunk in one go: row w of values and positions gets
    the magnitudes in [lows[w], highs[w]] (a side may be infinite) and their positions (+ offset), in order,
    counts[w] how many (each row one entry longer than its count: writes are made before the test decides).

    A loop whose writes sit behind a branch does not vectorise and mispredicts (~0.7 ns an entry a window);
    here vectorised passes flag the entries inside any window (`flags`, uint8 scratch of the chunk's length
    rounded up to 8), the flagged positions are listed (`list_flagged`, into `hits`, int32 scratch of the
    chunk's length; `flagged`: the windows' counts added up), their magnitudes computed once (`magnitudes`,
    float32 scratch as long),
    and only those are gathered, a window at a time, without branches: 0.2 ns an entry for one window, 0.7
    for Arcee Fusion's three. (All windows per hit kept the counts in memory, each hit waiting on the last
    one's stores: Arcee Fusion's gather 2.0 ns an entry of the chunk, against 1.2 a window at a time.)"""
    k, n = lows.size, model.size
    for i in range(n, flags.size):
        flags[i] = 0
    for w in range(k):
        lo, hi = lows[w], highs[w]
        if w == 0:
            for i in range(n):
                a = abs(widen(model[i]) - widen(base[i]))
                flags[i] = (a >= lo) & (a <= hi)
        else:
            for i in range(n):
                a = abs(widen(model[i]) - widen(base[i]))
                flags[i] |= (a >= lo) & (a <= hi)
    gather_flagged(model, base, lows, highs, offset, values, positions, counts, flagged, flags, hits, magnitudes)


# Flagged share above which `list_flagged` lists every entry branch-free: a set bit costs ~16 ns of mispredicted
# branches, a branch-free entry ~0.4 ns (Arcee Fusion's three quartile windows flag ~5% of a chunk: 0.71 ->
# 0.43 ns an entry; a lone TIES window flags well under 2.5%).
DENSE_FLAGS = 40


def _host_has_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512 (its compress instructions), as numba picks the target:
    the host's CPU unless NUMBA_CPU_NAME names another."""
    from numba.core import config
    from llvmlite import binding

    if config.CPU_NAME:
        return False
    return bool(binding.get_host_cpu_features().get("avx512f", False))


# `list_flagged` lists by vector compress stores (`compress_flagged`) where they are single instructions; LLVM
# makes a masked compress store a branch a lane elsewhere. A global: numba compiles it in as a constant.
VECTOR_COMPRESS = _host_has_avx512()
COMPRESS_WIDTH = 16  # flags a step of `compress_flagged`


@intrinsic
def compress_flagged(typingctx, flags, blocks, hits):
    """hits[:found] = the positions i < blocks * COMPRESS_WIDTH with flags[i] != 0 (uint8), ascending;
    returns found. Per step the flags' mask picks the positions out of a vector of them (LLVM's
    masked.compressstore: vpcompressd with AVX-512), whatever their density: 0.08-0.10 ns an entry on a
    Xeon, against 0.11 (1% flagged) to 0.48 (5% or more) for `list_flagged`'s other ways."""
    w = COMPRESS_WIDTH
    i32, i64 = ir.IntType(32), ir.IntType(64)
    bytes_, positions, mask = ir.VectorType(ir.IntType(8), w), ir.VectorType(i32, w), ir.VectorType(ir.IntType(1), w)

    def codegen(context, builder, signature, args):
        flags_at = context.make_array(signature.args[0])(context, builder, args[0]).data
        hits_at = context.make_array(signature.args[2])(context, builder, args[2]).data
        store = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [positions, i32.as_pointer(), mask]), f"llvm.masked.compressstore.v{w}i32"
        )
        bits = ir.IntType(w)
        population = cgutils.get_or_insert_function(builder.module, ir.FunctionType(bits, [bits]), f"llvm.ctpop.i{w}")
        found = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))
        at = cgutils.alloca_once_value(builder, ir.Constant(positions, list(range(w))))
        with cgutils.for_range(builder, args[1]) as loop:
            step = builder.load(builder.bitcast(builder.gep(flags_at, [builder.mul(loop.index, ir.Constant(i64, w))]), bytes_.as_pointer()), align=1)
            flagged = builder.icmp_unsigned("!=", step, ir.Constant(bytes_, [0] * w))
            count = builder.load(found)
            builder.call(store, [builder.load(at), builder.gep(hits_at, [count]), flagged])
            builder.store(builder.add(count, builder.zext(builder.call(population, [builder.bitcast(flagged, bits)]), i64)), found)
            builder.store(builder.add(builder.load(at), ir.Constant(positions, [w] * w)), at)
        return builder.load(found)

    if flags == types.uint8[::1] and hits == types.int32[::1] and isinstance(blocks, types.Integer):
        return types.int64(flags, blocks, hits), codegen
    return None


@jit
def list_flagged(flags, n, flagged, hits):
    """hits[:found] = the positions i < n with flags[i] != 0, ascending; returns found (`hits`: int32, holds
    n). `flagged`: how many there are, as the counting pass found them (more where windows overlap): it only
    picks the listing where there is no AVX-512 (`list_by_scan`)."""
    if VECTOR_COMPRESS:
        return list_by_compress(flags, n, hits)
    return list_by_scan(flags, n, flagged, hits)


@jit
def list_by_compress(flags, n, hits):
    """`list_flagged` by vector compress stores (`compress_flagged`), the last n % COMPRESS_WIDTH one by one."""
    blocks = n // COMPRESS_WIDTH
    return _list_every(flags, blocks * COMPRESS_WIDTH, n, compress_flagged(flags, blocks, hits), hits)


@jit
def _list_every(flags, start, n, found, hits):
    """Go on listing the flagged positions from `start` to n, `found` listed so far, by a branch-free pass
    over every entry (it writes hits[found] for every i); returns the new count."""
    for i in range(start, n):
        hits[found] = i
        found += flags[i] != 0
    return found


@jit
def list_by_scan(flags, n, flagged, hits):
    """`list_flagged` without vector compress: sparse flags by the set bits of eight flags a word, dense ones
    (`flagged` over n / DENSE_FLAGS) by a branch-free pass over every entry (it writes hits[found] for
    every i)."""
    if flagged * DENSE_FLAGS > n:
        return _list_every(flags, 0, n, 0, hits)
    found = 0
    words = flags.view(np.uint64)
    for q in range(words.size):
        word = words[q]
        while word != 0:
            hits[found] = 8 * q + np.int64(trailing_zeros(word) >> np.uint64(3))
            found += 1
            word &= word - np.uint64(1)
    return found


@jit
def gather_flagged(model, base, lows, highs, offset, values, positions, counts, flagged, flags, hits, magnitudes):
    """`windows_gather` after its flag passes: list the flagged positions and gather each window's entries
    (`flagged`: the windows' counts added up, see `list_flagged`)."""
    found = list_flagged(flags, model.size, flagged, hits)
    for t in range(found):
        i = hits[t]
        magnitudes[t] = abs(widen(model[i]) - widen(base[i]))
    _split_windows(magnitudes, hits, found, lows, highs, offset, values, positions, counts)


@jit
def gather_stored(stored, lows, highs, offset, values, positions, counts, flagged, flags, hits, magnitudes):
    """`gather_flagged` from the chunk's magnitudes as `windows_tally` stored them (`stored`, float32, the
    chunk's length) instead of the inputs: the flagged entries (1-2% of a TIES chunk, scattered over a third
    of its cache lines) are read back from the 1 MB scratch, in cache, where recomputing them read the two
    inputs at random again (1B, layer 3's matrices, three fine-tunes: tally and gather 1.77 -> 1.37 ns an
    entry)."""
    found = list_flagged(flags, stored.size, flagged, hits)
    for t in range(found):
        magnitudes[t] = stored[hits[t]]
    _split_windows(magnitudes, hits, found, lows, highs, offset, values, positions, counts)


@jit
def _split_windows(magnitudes, hits, found, lows, highs, offset, values, positions, counts):
    """Row w of values and positions gets the listed magnitudes (magnitudes[:found], at hits[:found]) inside
    [lows[w], highs[w]], with their positions + offset, in order; counts[w] how many. A window at a time, its
    count in a register, without branches (each row is written one entry past its count)."""
    for w in range(lows.size):
        lo, hi, c = lows[w], highs[w], 0
        for t in range(found):
            a = magnitudes[t]
            values[w, c] = a
            positions[w, c] = offset + hits[t]
            c += (a >= lo) & (a <= hi)
        counts[w] = c


@jit
def windows_tally(model, base, lows, highs, gathers, used, tallies, flags, magnitudes):
    """One pass for `used` (1 to 3) selection windows [lows[w], highs[w]] of three (pad with [nan, nan]):
    tallies[w] += the magnitudes |model - base| above highs[w], tallies[3 + w] += those inside, tallies[6] +=
    the non-zero ones; flags[i] = 1 where entry i is inside a window with gathers[w] != 0, else 0 (flags past
    the chunk are zeroed); magnitudes[i] = entry i's magnitude, for `gather_stored`. A NaN is in no window and
    above none. For several windows this reads the chunk once, where a count a window and a flag pass a
    window read it twice a window. Chunks of fewer than 2^31 entries (int32 counters, as in `window_count`).
    With one or two windows (most of TIES's and Breadcrumbs' chunks), a copy of the loop without the third;
    its tallies stay as they were. (The caller says how many.)"""
    if used <= 2:
        _tally_loop(model, base, lows, highs, gathers, tallies, flags, magnitudes, False)
    else:
        _tally_loop(model, base, lows, highs, gathers, tallies, flags, magnitudes, True)


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", inline="always")
def _tally_loop(model, base, lows, highs, gathers, tallies, flags, magnitudes, third):
    """`windows_tally`'s loop, inlined where it is called so that the constant `third` folds away."""
    lo0, lo1, lo2 = lows[0], lows[1], lows[2]
    hi0, hi1, hi2 = highs[0], highs[1], highs[2]
    g0, g1, g2 = gathers[0] != 0, gathers[1] != 0, gathers[2] != 0
    above0 = above1 = above2 = inside0 = inside1 = inside2 = nonzero = np.int32(0)
    zero = np.float32(0)
    n = model.size
    for i in range(n):
        a = abs(widen(model[i]) - widen(base[i]))
        magnitudes[i] = a
        in0 = (a >= lo0) & (a <= hi0)
        in1 = (a >= lo1) & (a <= hi1)
        above0 = np.int32(above0 + np.int32(a > hi0))
        above1 = np.int32(above1 + np.int32(a > hi1))
        inside0 = np.int32(inside0 + np.int32(in0))
        inside1 = np.int32(inside1 + np.int32(in1))
        nonzero = np.int32(nonzero + np.int32(a != zero))
        if third:
            in2 = (a >= lo2) & (a <= hi2)
            above2 = np.int32(above2 + np.int32(a > hi2))
            inside2 = np.int32(inside2 + np.int32(in2))
            flags[i] = (in0 & g0) | (in1 & g1) | (in2 & g2)
        else:
            flags[i] = (in0 & g0) | (in1 & g1)
    for i in range(n, flags.size):
        flags[i] = 0
    tallies[0] += above0
    tallies[1] += above1
    tallies[2] += above2
    tallies[3] += inside0
    tallies[4] += inside1
    tallies[5] += inside2
    tallies[6] += nonzero


@jit
def to_bfloat16(values, out):
    """out = the float32 `values` rounded to bfloat16 bit patterns (uint16; see `narrow`)."""
    for i in range(out.size):
        out[i] = narrow(values[i], out)


# numpy's sfc64_next, for reference: drawn = s0 + s1 + s3; the next state is (s1 ^ (s1 >> 11), s2 + (s2 << 3),
# rotl(s2, 24) + drawn, s3 + 1). `sfc64_lanes` runs it for LANES streams at once.


@intrinsic
def sfc64_lanes(typingctx, state, firsts, seconds, steps):
    """`steps` steps of the LANES SFC64 streams whose states are the columns of `state` ((4, LANES) uint64, C
    order: row q holds word q of every stream); the lower halves of step s's draws go to the int32
    firsts[s * LANES:(s + 1) * LANES], their upper halves to seconds[...] (so that the loops reading them
    work on eight int32 a 256-bit vector, not four uint64: `_decide` 0.40 -> 0.21 ns an entry).
    Written as vector IR so that the streams step together in SIMD registers: numba leaves LLVM's SLP
    vectoriser off, and a loop over the lanes was not vectorised (2.2 ns a draw, against 0.5 here and 1.4
    for one serial stream). The state stays in registers for all the steps and is stored once at the end:
    stored and reloaded at every step, each step waited on the last one's store (and on the stores of the
    draws, which the loads could not be proven not to alias), 0.55 against 0.2 ns a draw on a Xeon."""
    lanes = ir.VectorType(ir.IntType(64), LANES)
    halves = ir.VectorType(ir.IntType(32), LANES)

    def codegen(context, builder, signature, args):
        st = context.make_array(signature.args[0])(context, builder, args[0])
        low_out, high_out = (context.make_array(signature.args[k])(context, builder, args[k]).data for k in (1, 2))

        def row(pointer, offset, vector=lanes):
            return builder.bitcast(builder.gep(pointer, [offset]), vector.as_pointer())

        def const(value):
            return ir.Constant(lanes, [ir.Constant(ir.IntType(64), value)] * LANES)

        rows = [row(st.data, ir.Constant(ir.IntType(64), q * LANES)) for q in range(4)]
        # allocas that LLVM's mem2reg turns into registers
        slots = [cgutils.alloca_once_value(builder, builder.load(r, align=8)) for r in rows]
        with cgutils.for_range(builder, args[3]) as loop:
            s0, s1, s2, s3 = (builder.load(slot) for slot in slots)
            drawn = builder.add(builder.add(s0, s1), s3)  # numpy's sfc64_next, lane by lane (see above)
            rotated = builder.or_(builder.shl(s2, const(24)), builder.lshr(s2, const(40)))
            after = (builder.xor(s1, builder.lshr(s1, const(11))), builder.add(s2, builder.shl(s2, const(3))),
                     builder.add(rotated, drawn), builder.add(s3, const(1)))
            for slot, value in zip(slots, after):
                builder.store(value, slot)
            at = builder.mul(loop.index, ir.Constant(loop.index.type, LANES))
            words = builder.bitcast(drawn, ir.VectorType(ir.IntType(32), 2 * LANES))  # little-endian: lower half first
            for out, half in ((low_out, 0), (high_out, 1)):
                picked = builder.shuffle_vector(words, words, ir.Constant(halves, [2 * k + half for k in range(LANES)]))
                builder.store(picked, row(out, at, halves), align=4)
        for r, slot in zip(rows, slots):
            builder.store(builder.load(slot), r, align=8)
        return context.get_dummy_value()

    words = types.int32[::1]
    if state == types.uint64[:, ::1] and firsts == words and seconds == words and isinstance(steps, types.Integer):
        return types.void(state, firsts, seconds, steps), codegen
    return None


@jit
def _partners(seconds, c, partner):
    """partner[j] = the column row entry j compares with: k = floor(h * (c - 1) / 2^32) for h its draw's
    upper half (seconds[j] read as unsigned), or k + 1 from column j on (vectorised). Both factors are
    widened from 32 bits so that LLVM multiplies with vpmuludq (32 x 32 -> 64 bits)."""
    others = np.uint64(np.uint32(c - 1))
    for j in range(c):
        pick = np.int32((np.uint64(np.uint32(seconds[j])) * others) >> np.uint64(32))
        partner[j] = pick + np.int32(pick >= np.int32(j))


@jit
def _fetch(values, index, out):
    """out[j] = values[index[j]]: scalar loads, for machines where vector gathers are slow (`_kernels.vector_gathers`)."""
    for j in range(out.size):
        out[j] = values[index[j]]


@jit
def _decide(bits, firsts, partner_bits, low, high, keep):
    """The keep test of one row from its draws' lower halves and the partners' magnitudes (vectorised)."""
    lo, hi = np.int32(low), np.int32(high)  # int32 compares: eight entries a 256-bit vector, not four
    for j in range(keep.size):
        first = firsts[j]
        u = np.int32(first >> np.int32(1))
        keep[j] = (u < lo) | ((u < hi) & (np.int32(partner_bits[j] - (first & np.int32(1))) < bits[j]))


def _splat(builder, value, vector):
    """`value` in every element of an LLVM vector of type `vector`."""
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count))


def _vector_gep(builder, base, index, pointers):
    """The addresses base + index[k] (a vector of pointers of type `pointers`): a getelementptr with a scalar
    base and a vector of int32 indices, which x86 gathers take as they are (vpgatherdd: 16 int32 indices an
    instruction, against 8 addresses of 64 bits). llvmlite's `gep` types its indices one by one and refuses a
    vector, so the instruction is made with a scalar index (every llvmlite takes that) and then given the
    vector index and the vector result type."""
    instruction = ir.instructions.GEPInstr(builder.block, base, [ir.Constant(ir.IntType(32), 0)], inbounds=True, name="")
    instruction.indices = [index]
    instruction.operands = [base, index]
    instruction.type = pointers
    builder._insert(instruction)
    return instruction


GATHER_WIDTH = 16  # entries a step of `partner_test_blocks`


@intrinsic
def partner_test_blocks(typingctx, bits, firsts, seconds, low, high, keep, kept, blocks):
    """DELLA's keep test of the first `blocks` * GATHER_WIDTH entries of a row in one pass: per step, the
    partners' columns (`_partners`), their magnitudes by one vector gather (LLVM's masked.gather), the test
    (`_decide`) into the bool `keep`, and kept = magnitude * keep (float32, for the row's L1 sum). As vector
    IR because numba's loops never gather: they load the partners one at a time (`_fetch`), and the three
    passes stored and reloaded the partners and their bits. Partners, loads, tests and kept magnitudes:
    ~0.95 -> 0.5 ns an entry on a Xeon (Emerald Rapids) with the row in cache."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    w = GATHER_WIDTH
    v8, v32, flags = (ir.VectorType(t, w) for t in (ir.IntType(8), i32, ir.IntType(1)))
    floats = ir.VectorType(ir.FloatType(), w)

    def codegen(context, builder, signature, args):
        row = context.make_array(signature.args[0])(context, builder, args[0])
        bits_at, firsts_at, seconds_at, keep_at, kept_at = (
            context.make_array(signature.args[k])(context, builder, args[k]).data if k else row.data for k in (0, 1, 2, 5, 6)
        )
        pointers = ir.VectorType(i32.as_pointer(), w)
        gather = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v32, [pointers, i32, flags, v32]), f"llvm.masked.gather.v{w}i32.v{w}p0i32"
        )
        # c - 1 (< 2^31) as a zero-extended 32-bit value, so that LLVM multiplies 32 x 32 -> 64 (vpmuludq, not vpmullq)
        halves = ir.VectorType(i64, w // 2)
        others = _splat(builder, builder.zext(builder.trunc(builder.sub(builder.extract_value(row.shape, 0), ir.Constant(i64, 1)), i32), i64), halves)
        low_words, high_words = ir.Constant(halves, [0xFFFFFFFF] * (w // 2)), ir.Constant(halves, [0xFFFFFFFF << 32] * (w // 2))
        thirty_two = ir.Constant(halves, [32] * (w // 2))
        lo, hi = (_splat(builder, builder.trunc(args[k], i32), v32) for k in (3, 4))
        one = ir.Constant(v32, [1] * w)
        columns = cgutils.alloca_once_value(builder, ir.Constant(v32, list(range(w))))

        def at(pointer, offset, vector):
            return builder.bitcast(builder.gep(pointer, [offset]), vector.as_pointer())

        with cgutils.for_range(builder, args[7]) as loop:
            offset = builder.mul(loop.index, ir.Constant(loop.index.type, w))
            column = builder.load(columns)
            # pick = (upper * (c - 1)) >> 32 for unsigned 32-bit words, without widening to a vector of w int64 (whose
            # conversions are shuffles): as w / 2 int64 pairs, the even words multiplied in place and the odd ones
            # shifted down first, each product's upper half put back in its word's place
            pairs = builder.bitcast(builder.load(at(seconds_at, offset, v32), align=4), halves)
            even = builder.mul(builder.and_(pairs, low_words), others)
            odd = builder.mul(builder.lshr(pairs, thirty_two), others)
            pick = builder.bitcast(builder.or_(builder.lshr(even, thirty_two), builder.and_(odd, high_words)), v32)
            partner = builder.add(pick, builder.zext(builder.icmp_signed(">=", pick, column), v32))
            addresses = _vector_gep(builder, bits_at, partner, pointers)
            partner_bits = builder.call(gather, [addresses, ir.Constant(i32, 4), ir.Constant(flags, [1] * w), ir.Constant(v32, ir.Undefined)])
            first, own = builder.load(at(firsts_at, offset, v32), align=4), builder.load(at(bits_at, offset, v32), align=4)
            u = builder.ashr(first, one)
            smaller = builder.icmp_signed("<", builder.sub(partner_bits, builder.and_(first, one)), own)
            keeps = builder.or_(builder.icmp_signed("<", u, lo), builder.and_(builder.icmp_signed("<", u, hi), smaller))
            builder.store(builder.zext(keeps, v8), at(keep_at, offset, v8), align=1)
            builder.store(builder.fmul(builder.bitcast(own, floats), builder.uitofp(keeps, floats)), at(kept_at, offset, floats), align=4)
            builder.store(builder.add(column, ir.Constant(v32, [w] * w)), columns)
        return context.get_dummy_value()

    words = types.int32[::1]
    if (bits == words and firsts == words and seconds == words and keep == types.boolean[::1] and kept == types.float32[::1]
            and isinstance(blocks, types.Integer)):
        return types.void(bits, firsts, seconds, low, high, keep, kept, blocks), codegen
    return None


@jit
def _row_buffers(c):
    """`_keep_row`'s scratch for rows of c entries, made once per call: the draws' two halves (whole steps of
    the lanes), the partners' columns and their magnitudes' bits (the scalar path's), the kept magnitudes.
    (Testing a long row a piece at a time, so that this stays in L1, gained at most 8% on rows of 8192.)"""
    steps = (c + LANES - 1) // LANES
    draws = np.empty((2, steps * LANES), dtype=np.int32)
    return draws, np.empty(c, dtype=np.int32), np.empty(c, dtype=np.int32), np.empty(c, dtype=np.float32)


@jit
def _keep_row(bits, state, low, high, gather, keep, kept, draws, partner, partner_bits):
    """DELLA's keep test of one row (int32 bit patterns of its magnitudes `bits`) into the bool `keep`, and
    its kept magnitudes into `kept`: its draws (all lanes at once), then the test by vector gathers
    (`partner_test_blocks`, the row's last c % GATHER_WIDTH entries one by one) when `gather`, else in
    passes: the partners, their magnitudes by scalar loads, the tests."""
    c = bits.size
    firsts, seconds = draws[0], draws[1]
    sfc64_lanes(state, firsts, seconds, firsts.size // LANES)
    done = 0  # entries whose kept magnitude is written
    if gather:
        done = c - c % GATHER_WIDTH
        partner_test_blocks(bits, firsts, seconds, low, high, keep, kept, done // GATHER_WIDTH)
        lo, hi = np.int32(low), np.int32(high)
        others = np.uint64(np.uint32(c - 1))
        for j in range(done, c):
            pick = np.int32((np.uint64(np.uint32(seconds[j])) * others) >> np.uint64(32))
            first = firsts[j]
            u = np.int32(first >> np.int32(1))
            partner_bits_j = bits[pick + np.int32(pick >= np.int32(j))]
            keep[j] = (u < lo) | ((u < hi) & (np.int32(partner_bits_j - (first & np.int32(1))) < bits[j]))
    else:
        _partners(seconds, c, partner)
        _fetch(bits, partner, partner_bits)
        _decide(bits, firsts, partner_bits, low, high, keep)
    magnitudes, kept_rest, keep_rest = bits[done:].view(np.float32), kept[done:], keep[done:]  # slices: no offset index
    for j in range(kept_rest.size):
        kept_rest[j] = magnitudes[j] * np.float32(keep_rest[j])


@jit
def partner_keep(bits, state, low, high, gather, out):
    """DELLA's keep test (see `_sparsify.PartnerKeep`) of the (r, c) magnitudes whose int32 bit patterns are
    `bits`, into the bool `out` (r, c). Entry (i, j) uses one 64-bit draw (lower half its first word, upper
    half its second) from stream j % LANES of `state` ((4, LANES), advanced), each row taking
    ceil(c / LANES) draws of every stream (`_sparsify.LaneWords` hands out the same). Row by row
    (`_keep_row`; `gather`: `_kernels.vector_gathers()`): 1.1-1.7 ns an entry on a Xeon against 3.9-6.6 for
    one loop drawing from one serial stream, whose chain of dependent steps, and the load and test
    interleaved with it, kept the loop scalar."""
    r, c = bits.shape
    draws, partner, partner_bits, kept = _row_buffers(c)
    for i in range(r):
        _keep_row(bits[i], state, low, high, gather, out[i], kept, draws, partner, partner_bits)


@intrinsic
def eight_accumulators(typingctx, x, start, blocks):
    """numpy's eight-accumulator sum of the `blocks` * 8 float32 entries of `x` from `start` (accumulator k
    adds entries k, k + 8, ... in order, then ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))), with the
    accumulators one vector register (0.44 ns an entry for eight scalars: numba leaves LLVM's SLP vectoriser
    off). The same additions in the same order: the same float32 result. Its adds form one chain of
    dependent vector adds; `four_runs_eight_accumulators` runs four such chains side by side."""
    vector = ir.VectorType(ir.FloatType(), 8)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        first = builder.gep(data, [args[1]])

        def load(pointer):
            return builder.load(builder.bitcast(pointer, vector.as_pointer()), align=4)

        acc = cgutils.alloca_once_value(builder, load(first))
        step = ir.Constant(args[2].type, 8)
        with cgutils.for_range(builder, builder.sub(args[2], ir.Constant(args[2].type, 1))) as loop:
            at = builder.mul(builder.add(loop.index, ir.Constant(loop.index.type, 1)), step)
            builder.store(builder.fadd(builder.load(acc), load(builder.gep(first, [at]))), acc)
        total = builder.load(acc)
        lane = [builder.extract_element(total, ir.Constant(ir.IntType(32), k)) for k in range(8)]
        pairs = [builder.fadd(lane[k], lane[k + 1]) for k in range(0, 8, 2)]
        return builder.fadd(builder.fadd(pairs[0], pairs[1]), builder.fadd(pairs[2], pairs[3]))

    if x == types.float32[::1] and isinstance(start, types.Integer) and isinstance(blocks, types.Integer):
        return types.float32(x, start, blocks), codegen
    return None


LEAF_MAX = 128  # numpy sums runs of up to this many entries as one leaf (`_block_sum`), halves longer ones


@jit
def _block_sum(x, start, n):
    """numpy's sum of a run of at most 128 entries: fewer than 8 in sequence, else on eight accumulators
    (`eight_accumulators`) and then the rest in sequence."""
    if n < 8:
        total = np.float32(-0.0)
        for i in range(start, start + n):
            total += x[i]
        return total
    whole = n - n % 8
    total = eight_accumulators(x, start, whole // 8)
    for i in range(start + whole, start + n):
        total += x[i]
    return total


@intrinsic
def four_runs_eight_accumulators(typingctx, x, starts, first, offset, blocks, out):
    """`eight_accumulators` of four runs of `blocks` * 8 entries at once: out[first + q] = the sum of the run
    from x[starts[first + q] - offset], q < 4. One run's accumulator is a chain of dependent vector adds (about
    0.25 ns an entry on a Xeon); four independent chains keep the adder busy. Each run's additions, and so its
    sum, are those of `eight_accumulators`."""
    vector = ir.VectorType(ir.FloatType(), 8)

    def codegen(context, builder, signature, args):
        data, run_starts, sums = (context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 1, 5))
        offset = context.cast(builder, args[3], signature.args[3], types.int64)
        firsts = [builder.gep(data, [builder.sub(builder.load(builder.gep(run_starts, [builder.add(args[2], ir.Constant(args[2].type, q))])), offset)])
                  for q in range(4)]

        def load(pointer):
            return builder.load(builder.bitcast(pointer, vector.as_pointer()), align=4)

        accs = [cgutils.alloca_once_value(builder, load(f)) for f in firsts]
        step = ir.Constant(args[4].type, 8)
        with cgutils.for_range(builder, builder.sub(args[4], ir.Constant(args[4].type, 1))) as loop:
            at = builder.mul(builder.add(loop.index, ir.Constant(loop.index.type, 1)), step)
            for acc, f in zip(accs, firsts):
                builder.store(builder.fadd(builder.load(acc), load(builder.gep(f, [at]))), acc)
        for q, acc in enumerate(accs):
            total = builder.load(acc)
            lane = [builder.extract_element(total, ir.Constant(ir.IntType(32), k)) for k in range(8)]
            pairs = [builder.fadd(lane[k], lane[k + 1]) for k in range(0, 8, 2)]
            value = builder.fadd(builder.fadd(pairs[0], pairs[1]), builder.fadd(pairs[2], pairs[3]))
            builder.store(value, builder.gep(sums, [builder.add(args[2], ir.Constant(args[2].type, q))]))
        return context.get_dummy_value()

    if (x == types.float32[::1] and starts == types.int64[::1] and out == types.float32[::1]
            and isinstance(first, types.Integer) and isinstance(offset, types.Integer) and isinstance(blocks, types.Integer)):
        return types.void(x, starts, first, offset, blocks, out), codegen
    return None


@jit
def sum_plan(n):
    """numpy's order of summing a contiguous run of n float32 (`np.add.reduce`): a run of at most 128 is a
    leaf, summed by `_block_sum`; a longer one is halved at a multiple of 8 and summed as left half plus
    right half. Returns (leaves, adds): leaves (2, L) int64, each leaf's start and length in order; adds
    (3, L - 1) int64, the additions in an order that has each operand ready: value[adds[0, k]] =
    value[adds[1, k]] + value[adds[2, k]], where values 0..L-1 are the leaves' sums and L.. the partial sums
    (`planned_sum`; the last addition's is the total). Made once per run length, so that neither the walk
    nor its branches are repeated row after row. The halving is walked on an explicit stack: numba's cache
    loaded a recursive version that crashed."""
    cap = n // 32 + 2  # runs longer than 128 are halved: each leaf is over 56 entries
    leaves, adds = np.empty((2, cap), dtype=np.int64), np.empty((3, cap), dtype=np.int64)
    path = np.empty((64, 3), dtype=np.int64)  # root to the current run: start, length, whether a right half
    pending = np.empty(64, dtype=np.int64)  # the values of the left halves whose right halves are not done
    path[0, 0], path[0, 1], path[0, 2] = 0, n, 0
    top, count, made, waiting = 0, 0, 0, 0
    while True:
        m = path[top, 1]
        if m > LEAF_MAX:  # descend into the left half
            half = m // 2 - (m // 2) % 8
            path[top + 1, 0], path[top + 1, 1], path[top + 1, 2] = path[top, 0], half, 0
            top += 1
            continue
        leaves[0, count], leaves[1, count] = path[top, 0], m
        value = count
        count += 1
        up = top
        while up > 0 and path[up, 2]:  # each right half finishes its parent: left + right
            waiting -= 1
            adds[0, made], adds[1, made], adds[2, made] = cap + made, pending[waiting], value
            value = cap + made
            made += 1
            up -= 1
        if up == 0:
            values = adds[:, :made].copy()
            for k in range(made):  # number the partial sums from L
                for q in range(3):
                    if values[q, k] >= cap:
                        values[q, k] += count - cap
            return leaves[:, :count].copy(), values
        pending[waiting] = value
        waiting += 1
        parent = up - 1  # `up` was a left half: go on with its parent's right half
        half = path[parent, 1] // 2 - (path[parent, 1] // 2) % 8
        path[up, 0], path[up, 1], path[up, 2] = path[parent, 0] + half, path[parent, 1] - half, 1
        top = up


@jit
def sum_scratch(leaves):
    """`planned_sum`'s float32 scratch for a plan with these leaves: the leaves' sums and the partial sums."""
    return np.empty(2 * leaves.shape[1], dtype=np.float32)


@jit
def leaf_sums(x, leaves, k0, k1, offset, scratch):
    """scratch[k] = numpy's sum of leaf k of a plan (`sum_plan`), k0 <= k < k1, the leaf's entries read from
    x[start - offset:], so that x may hold only the span of entries these leaves cover. Four leaves at a time
    where four in a row have as many blocks of 8 (`four_runs_eight_accumulators`; the rows of 2048 or 5632
    entries of a 1B model's weights all do), else one (`_block_sum`)."""
    starts, lengths = leaves[0], leaves[1]
    k = k0
    while k < k1:
        blocks = lengths[k] // 8
        if k + 4 <= k1 and blocks > 0 and lengths[k + 1] // 8 == blocks and lengths[k + 2] // 8 == blocks and lengths[k + 3] // 8 == blocks:
            four_runs_eight_accumulators(x, starts, k, offset, blocks, scratch)
            for q in range(k, k + 4):  # the entries after the last block, in sequence (`_block_sum`)
                total = scratch[q]
                for i in range(starts[q] - offset + blocks * 8, starts[q] - offset + lengths[q]):
                    total += x[i]
                scratch[q] = total
            k += 4
        else:
            scratch[k] = _block_sum(x, starts[k] - offset, lengths[k])
            k += 1


@jit
def added_leaves(adds, count, scratch):
    """The total of a plan whose `count` leaf sums are in scratch[:count]: its additions in order (`sum_plan`)."""
    made = adds.shape[1]
    targets, lefts, rights = adds[0], adds[1], adds[2]
    for a in range(made):
        scratch[targets[a]] = scratch[lefts[a]] + scratch[rights[a]]
    return scratch[count + made - 1] if made else scratch[0]


@jit
def planned_sum(x, leaves, adds, scratch):
    """The float32 sum of x (float32, contiguous, of the length the plan `leaves, adds` was made for:
    `sum_plan`) in numpy's order, so that a compiled sum equals numpy's bit for bit: the leaves first
    (`leaf_sums`), then the plan's additions (2048 entries: 0.17 -> 0.08 ns an entry against one leaf at a
    time, walking the halving each time)."""
    count = leaves.shape[1]
    leaf_sums(x, leaves, 0, count, 0, scratch)
    return added_leaves(adds, count, scratch)


SPAN_LEAVES = 16  # leaves a span of `leaf_span`
SPAN_WIDTH = SPAN_LEAVES * LEAF_MAX  # the most entries a span covers: 2048


@jit
def leaf_span(leaves, k):
    """(k1, start, end): the span of leaves k <= leaf < k1 of a plan, SPAN_LEAVES of them (fewer at the end),
    and the entries [start, end) they cover. Loops that make the values they sum write a span into a scratch
    that stays in L1 and sum it there (`leaf_sums`), rather than writing a whole chunk of values (2^18
    float32 per model, past L2) and reading it back."""
    k1 = min(k + SPAN_LEAVES, leaves.shape[1])
    return k1, leaves[0, k], leaves[0, k1 - 1] + leaves[1, k1 - 1]


@jit
def della_rows(model, base, state, low, high, gather, keep, sums):
    """`partner_keep` on the magnitudes |model - base| of the (r, c) rows of a chunk of the inputs as stored
    (flat), with each row's L1 sums: sums[i] = (sum of |d|, sum of the kept |d|), each in numpy's order
    (`planned_sum`; `_sparsify.L1Norms.add_rows` computes the same with numpy), while the row is in cache:
    numpy's sum, product and sum of the chunk cost about 1 ns an entry. Each row's magnitudes are computed
    just before its test, into a row's scratch that stays in L1 (a chunk's magnitudes first, then the rows:
    2.2 against 2.1 ns an entry in cache; an earlier row-by-row version had been slower, 5.1 against 2.3,
    most likely an offset index that stopped the loop's vectorisation)."""
    r, c = keep.shape
    draws, partner, partner_bits, kept = _row_buffers(c)
    magnitudes = np.empty(c, dtype=np.float32)
    bits = magnitudes.view(np.int32)
    leaves, adds = sum_plan(c)
    scratch = sum_scratch(leaves)
    for i in range(r):
        magnitudes_into(model[i * c : (i + 1) * c], base[i * c : (i + 1) * c], magnitudes)
        _keep_row(bits, state, low, high, gather, keep[i], kept, draws, partner, partner_bits)
        sums[i, 0] = planned_sum(magnitudes, leaves, adds, scratch)
        sums[i, 1] = planned_sum(kept, leaves, adds, scratch)


@jit
def pair_product_sums(model0, model1, base, block, sums):
    """Model Stock's inner products of two task vectors d0, d1 (model - base, float32) over a chunk, a block
    of `block` entries at a time (the last may be shorter): sums[b] = (Σ d0·d0, Σ d0·d1, Σ d1·d1) over block
    b, each product rounded to float32 and summed in numpy's order (`planned_sum`), so these are the sums
    `model_stock`'s numpy path takes of the same blocks."""
    _product_sums(model0, model1, model1[:0], base, block, sums)


@jit
def triple_product_sums(model0, model1, model2, base, block, sums):
    """`pair_product_sums` for three task vectors: sums[b] = (Σ d0·d0, Σ d0·d1, Σ d0·d2, Σ d1·d1, Σ d1·d2,
    Σ d2·d2) over block b (the pairs i <= j in row-major order, as `model_stock` lists them)."""
    _product_sums(model0, model1, model2, base, block, sums)


@jit
def block_plan(m):
    """(leaves, adds, scratch): `sum_plan` of m entries with its `sum_scratch`, for loops that sum blocks."""
    leaves, adds = sum_plan(m)
    return leaves, adds, sum_scratch(leaves)


@jit
def block_span(b, block, n, whole):
    """(start, length, plan) of block b of the n entries cut in `block`s: the plan `whole` (`block_plan(block)`),
    or one made for the last block when it is shorter."""
    start = b * block
    m = min(block, n - start)
    return start, m, (whole if m == block else block_plan(m))


@jit
def _product_sums(model0, model1, model2, base, block, sums):
    """The block loop of `pair_product_sums` (`model2` empty: three products) and `triple_product_sums` (six):
    each block's products written to rows, then each row summed by the block's plan. The model count is
    tested per block, outside the entries' loops, which stay vectorised."""
    n = base.size
    three = model2.size > 0
    products = np.empty((6 if three else 3, block), dtype=np.float32)
    whole = block_plan(block)
    for b in range((n + block - 1) // block):
        start, m, plan = block_span(b, block, n, whole)
        leaves, adds, scratch = plan
        first, second, bases = model0[start : start + m], model1[start : start + m], base[start : start + m]
        if three:
            third = model2[start : start + m]
            p00, p01, p02, p11, p12, p22 = products[0], products[1], products[2], products[3], products[4], products[5]
            for i in range(m):
                x = widen(bases[i])
                d0, d1, d2 = widen(first[i]) - x, widen(second[i]) - x, widen(third[i]) - x
                p00[i], p01[i], p02[i], p11[i], p12[i], p22[i] = d0 * d0, d0 * d1, d0 * d2, d1 * d1, d1 * d2, d2 * d2
        else:
            p00, p01, p11 = products[0], products[1], products[2]
            for i in range(m):
                x = widen(bases[i])
                d0, d1 = widen(first[i]) - x, widen(second[i]) - x
                p00[i], p01[i], p11[i] = d0 * d0, d0 * d1, d1 * d1
        for k in range(products.shape[0]):
            sums[b, k] = planned_sum(products[k][:m], leaves, adds, scratch)


@jit
def product_sums(models, base, block, rows, products, sums):
    """`_product_sums` for any number of task vectors d = model - base (a tuple of the models' chunks, unrolled
    over): per `block` of entries, every d as a float32 row (`rows`: one a model, `block` wide), then
    sums[b, p] = the block's Σ dᵢ·dⱼ for the pairs i <= j in row-major order, each product rounded and summed
    in numpy's order (`planned_sum`), as `_linalg.block_sums` sums them; `products`: float32 scratch of
    `block`. Rows of a block stay in cache, where rows of a whole chunk spill out of it."""
    n = base.size
    count = rows.shape[0]
    whole = block_plan(block)
    for b in range((n + block - 1) // block):
        start, m, plan = block_span(b, block, n, whole)
        leaves, adds, scratch = plan
        task_vector_block(models, base, start, m, rows)
        p = 0
        for i in range(count):
            for k in range(i, count):
                first, second = rows[i], rows[k]
                for t in range(m):
                    products[t] = first[t] * second[t]
                sums[b, p] = planned_sum(products[:m], leaves, adds, scratch)
                p += 1


@jit
def pair_square_sums(model0, model1, base, keep, apart, sums):
    """SCE's energies of two task vectors d = model - base over a chunk: sums[j] = Σ d_j² over the entries
    selected (`keep` != 0 when not empty, and the models' distance above `apart`: see `pair_delta_merge_into`),
    each square rounded to float32 and summed in numpy's order (`planned_sum`): the torch path's masked
    deltas, `np.square` and `np.add.reduce`. The squares are made and summed a span of leaves at a time
    (`leaf_span`): 0.91-1.05 ns an entry against 1.11-1.31 writing the chunk's squares first (one chunk of the
    bench's 1B bf16 merge, alternating runs)."""
    n = base.size
    leaves, adds = sum_plan(n)
    count = leaves.shape[1]
    first_sums, second_sums = sum_scratch(leaves), sum_scratch(leaves)
    squares = np.empty((2, SPAN_WIDTH), dtype=np.float32)
    ge, gt, split = distance_bounds(apart, n)
    k = 0
    while k < count:
        k1, start, end = leaf_span(leaves, k)
        m = end - start
        span_keep = keep[start:end] if keep.size else keep
        _span_squares(model0[start:end], model1[start:end], base[start:end], span_keep, (ge, gt, np.int32(split - start)),
                      squares[0, :m], squares[1, :m])
        leaf_sums(squares[0], leaves, k, k1, start, first_sums)
        leaf_sums(squares[1], leaves, k, k1, start, second_sums)
        k = k1
    sums[0] = added_leaves(adds, count, first_sums)
    sums[1] = added_leaves(adds, count, second_sums)


@jit
def square_sums(models, base, keep, sums):
    """`pair_square_sums` for any number of task vectors (a tuple of the models' chunks, unrolled over, so
    their dtypes may differ), selected by `keep` alone (empty: every entry): sums[j] = Σ d_j² in numpy's
    order. Per span of leaves, each model's squares are made into a scratch that stays in L1 and summed
    there, instead of rows of the whole chunk written and read back."""
    n = base.size
    leaves, adds = sum_plan(n)
    count = leaves.shape[1]
    scratch = np.empty((len(models), 2 * count), dtype=np.float32)  # `sum_scratch` a model
    squares = np.empty(SPAN_WIDTH, dtype=np.float32)
    zero = np.float32(0)
    k = 0
    while k < count:
        k1, start, end = leaf_span(leaves, k)
        m = end - start
        below = base[start:end]
        j = 0
        for model in literal_unroll(models):
            chunk = model[start:end]
            if keep.size:
                span_keep = keep[start:end]
                for i in range(m):
                    d = widen(chunk[i]) - widen(below[i]) if span_keep[i] != 0 else zero
                    squares[i] = d * d
            else:
                for i in range(m):
                    d = widen(chunk[i]) - widen(below[i])
                    squares[i] = d * d
            leaf_sums(squares, leaves, k, k1, start, scratch[j])
            j += 1
        k = k1
    for j in range(len(models)):
        sums[j] = added_leaves(adds, count, scratch[j])


@jit
def _span_squares(model0, model1, base, keep, apart, first, second):
    """first, second = the squared deltas of the selected entries (see `pair_square_sums`), 0 elsewhere; `apart`'s
    split relative to this span (int32, may be below 0)."""
    zero = np.float32(0)
    if keep.size == 0:
        for i in range(base.size):
            x, y0, y1 = widen(base[i]), widen(model0[i]), widen(model1[i])
            selected = far_apart(y0, y1, i, apart)
            d0, d1 = (y0 - x if selected else zero), (y1 - x if selected else zero)
            first[i], second[i] = d0 * d0, d1 * d1
    else:
        for i in range(base.size):
            x, y0, y1 = widen(base[i]), widen(model0[i]), widen(model1[i])
            selected = far_apart(y0, y1, i, apart) & (keep[i] != 0)
            d0, d1 = (y0 - x if selected else zero), (y1 - x if selected else zero)
            first[i], second[i] = d0 * d0, d1 * d1


@jit
def stock_into(model0, model1, base, ratios, block, out):
    """out = (d0 + d1) * t + base for two task vectors d = model - base, t = ratios[b] for the entries of block
    b (`block` entries each: one t per row, or one for the chunk): the float operations of `model_stock`'s
    torch path in its order."""
    n = out.size
    for b in range((n + block - 1) // block):
        start = b * block
        m = min(block, n - start)
        first, second, bases, target = model0[start : start + m], model1[start : start + m], base[start : start + m], out[start : start + m]
        t = ratios[b]
        for i in range(m):
            x = widen(bases[i])
            target[i] = narrow(((widen(first[i]) - x) + (widen(second[i]) - x)) * t + x, target)


@jit
def pair_combine_into(model0, model1, base, c0, c1, out):
    """out = ((d0·c0) + (d1·c1)) + base for two task vectors d = model - base: `_linalg.combine_task_vectors`'
    float operations in its order, for two models."""
    for i in range(out.size):
        x = widen(base[i])
        out[i] = narrow(((widen(model0[i]) - x) * c0 + (widen(model1[i]) - x) * c1) + x, out)


@jit
def triple_combine_into(model0, model1, model2, base, c0, c1, c2, out):
    """out = (((d0·c0) + (d1·c1)) + (d2·c2)) + base: `pair_combine_into` for three task vectors."""
    for i in range(out.size):
        x = widen(base[i])
        out[i] = narrow(((widen(model0[i]) - x) * c0 + (widen(model1[i]) - x) * c1 + (widen(model2[i]) - x) * c2) + x, out)


@jit
def bernoulli_rows(model, base, state, threshold, draws, keep, sums):
    """DARE's keep test (`bernoulli_keep`) of a chunk of the inputs as stored, with the chunk's L1 sums when
    `sums` is not empty: sums[0] = (sum of |d|, sum of the kept |d|), each in numpy's order (`planned_sum`,
    as `_sparsify.L1Norms.add` sums the chunk), the magnitudes made and summed a span of leaves at a time
    (`leaf_span`; the sums' share 0.48-0.50 ns an entry against 0.56-0.59 writing the chunk's magnitudes
    first, 2^18 bf16 entries on a Xeon, alternating runs). numpy's sum, product and sum cost 0.9 ns an entry
    after the keep test."""
    bernoulli_keep(state, threshold, draws, keep)
    if sums.size == 0:
        return
    leaves, adds = sum_plan(keep.size)
    count = leaves.shape[1]
    all_sums, kept_sums = sum_scratch(leaves), sum_scratch(leaves)
    mags = np.empty(SPAN_WIDTH, dtype=np.float32)
    k = 0
    while k < count:
        k1, start, end = leaf_span(leaves, k)
        span, kept = mags[: end - start], keep[start:end]
        magnitudes_into(model[start:end], base[start:end], span)
        leaf_sums(mags, leaves, k, k1, start, all_sums)
        for i in range(span.size):
            span[i] = span[i] * np.float32(kept[i])
        leaf_sums(mags, leaves, k, k1, start, kept_sums)
        k = k1
    sums[0, 0] = added_leaves(adds, count, all_sums)
    sums[0, 1] = added_leaves(adds, count, kept_sums)


@jit
def bernoulli_keep(state, threshold, draws, out):
    """out[i] = (entry i's word < threshold): DARE's independent keeps, from the LANES SFC64 streams of
    `state` ((4, LANES) uint64, `_sparsify.lane_state`) stepped together (`sfc64_lanes`). Words come in
    blocks of KEEP_BLOCK entries (a tensor's last block may be shorter): a block of m entries takes
    s = ceil(m / (2 * LANES)) steps, its first LANES * s entries the lower halves of the draws in step then
    lane order, the rest their upper halves (`_sparsify.LaneWords.block_words`: the same words with numpy).
    `out` starts at a block and holds whole blocks but for the tensor's last. `draws`: (2, KEEP_BLOCK // 2)
    int32 scratch. One serial stream, as before round sixteen, took 0.83 ns an entry in cache; this 0.24."""
    n = out.size
    firsts, seconds = draws[0], draws[1]
    below = np.int32(threshold)  # int32 compares: eight a 256-bit vector (against an int64: 0.96 ns an entry)
    for start in range(0, n, KEEP_BLOCK):
        m = min(KEEP_BLOCK, n - start)
        steps = (m + 2 * LANES - 1) // (2 * LANES)
        sfc64_lanes(state, firsts, seconds, steps)
        lower = min(m, LANES * steps)
        lows, highs = out[start : start + lower], out[start + lower : start + m]  # slices: no offset index (`_kernels`)
        for i in range(lows.size):
            lows[i] = firsts[i] < below
        for i in range(highs.size):
            highs[i] = seconds[i] < below