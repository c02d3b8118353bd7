"""Sparse micro-kernels emitted as LLVM vector IR through ``numba.core.extending.intrinsic``.

Numba keeps array accumulators on the heap and LLVM will not vectorise a sparse row's reduction without gathers
(slow on Zen 4), so each kernel below handles one *sparse row* (one output channel or one block of channels)
with ``alloca``'d vector accumulators that LLVM promotes to registers. Every kernel takes the row's stored range
``[start, end)`` of the index / value arrays; array arguments only contribute their data pointers, offsets are
in elements. Index arrays may be uint16 or uint32.

* ``csr_lanes_f32``: lanes = batch. ``out[out_off + j] = sum_p val[p] * xT[idx[p] * ldx + b0 + j]``, ``j < nv*16``
  (``xT`` is the transposed, zero-padded activation matrix), two accumulator sets for latency.
* ``bsr_dot_f32``: blocks of ``L`` consecutive inputs for one output (``L`` in 4, 8, 16), lanes = inputs.
  ``out[out_off + t*ldo] = sum_p dot(x[t*ldx + idx[p]*L : +L], val[p*L : +L])`` for ``t < mr`` rows.
* ``bsr_bcast_f32``: blocks of ``r`` inputs x ``L`` outputs (``L`` in 4, 8, 16), lanes = outputs.
  ``out[out_off + t*ldo + j] = sum_p sum_i x[t*ldx + idx[p]*r + i] * val[(p*r + i)*L + j]``.
* ``bsr_bcast_i8``: ``bsr_bcast_f32`` for int8 weights and int8 activations, exact int32 lanes: int8 blocks along
  the outputs, which block pruning of a layer fed by sparse features needs. With AVX2, two inputs at a time (the
  two weight rows interleaved into int16 pairs, ``pmaddwd``); else (and for odd ``r`` > 1) sign-extend, multiply,
  add.
* ``bsr_dot_vnni``: int8 ``bsr_dot``: ``L`` (16, 32, 64) consecutive inputs, u8 activations x s8 weights summed
  into int32 with ``vpdpbusd`` (AVX512_VNNI + VL only; see ``has_avx512_vnni``).

Gather (batch-1 CSR) and portable integer kernels live in ``_csr_simd``.
"""

from __future__ import annotations

from typing import Callable

import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from leanserve.kernels._simd import has_avx2, has_avx512_vnni, pmaddwd_wide

__all__ = ["bsr_bcast_f32", "bsr_bcast_i8", "bsr_dot_f32", "bsr_dot_vnni", "csr_lanes_f32", "has_avx512_vnni", "MAX_MR"]

MAX_MR = 4  # batch rows per register tile in the block kernels
F32_WIDTHS = (4, 8, 16)
VNNI_WIDTHS = (16, 32, 64)  # bytes per block -> <4|8|16 x i32>

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)


def _c64(v: int) -> ir.Constant:
    return ir.Constant(_I64, v)


def _splat(builder: ir.IRBuilder, vec: ir.VectorType, scalar: ir.Value) -> ir.Value:
    undef = ir.Constant(vec, ir.Undefined)
    first = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, vec.count), [0] * vec.count))


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, acc: ir.Value) -> ir.Value:
    vec = acc.type
    name = f"llvm.fma.v{vec.count}f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), name)
    return builder.call(fn, [a, b, acc])


def _vnni(builder: ir.IRBuilder, acc: ir.Value, u8: ir.Value, s8: ir.Value) -> ir.Value:
    vec = acc.type
    name = f"llvm.x86.avx512.vpdpbusd.{vec.count * 32}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), name)
    return builder.call(fn, [acc, u8, s8])


def _hsum(builder: ir.IRBuilder, v: ir.Value, add: Callable) -> ir.Value:
    # Tree reduction: log2(L) shuffles instead of an ordered L-long chain of adds.
    n = v.type.count
    while n > 1:
        half = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, n))))
        v = add(lo, hi)
        n = half
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _load_vec(builder: ir.IRBuilder, base: ir.Value, off: ir.Value, vec: ir.VectorType) -> ir.Value:
    return builder.load(builder.bitcast(builder.gep(base, [off]), vec.as_pointer()), align=1)


def _ptr(context, builder, aryty, val, elt: ir.Type) -> ir.Value:
    return builder.bitcast(context.make_array(aryty)(context, builder, val).data, elt.as_pointer())


def _index(context, builder, aryty, val, p: ir.Value) -> ir.Value:
    """``zext(idx[p])`` as i64 for an unsigned index array."""
    elt = context.get_data_type(aryty.dtype)
    return builder.zext(builder.load(builder.gep(_ptr(context, builder, aryty, val, elt), [p])), _I64)


def _switch(builder: ir.IRBuilder, key: ir.Value, cases: dict[int, Callable[[], None]]) -> None:
    """Emit ``switch key`` with one block per compile-time variant; unknown keys do nothing."""
    done = builder.append_basic_block("sw.done")
    sw = builder.switch(key, done)
    for k, emit in cases.items():
        block = builder.append_basic_block(f"sw.{k}")
        sw.add_case(_c64(k), block)
        builder.position_at_end(block)
        emit()
        builder.branch(done)
    builder.position_at_end(done)


def _for(builder: ir.IRBuilder, start: ir.Value, stop: ir.Value):
    return cgutils.for_range_slice(builder, start, stop, _c64(1), intp=_I64)


@intrinsic
def csr_lanes_f32(typingctx, idx, val, start, end, xT, ldx, b0, out, out_off, nv):
    """fp32 CSR row over ``nv * 16`` batch lanes (``nv`` in 1..4); see the module docstring."""
    sig = types.void(idx, val, types.intp, types.intp, xT, types.intp, types.intp, out, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        idx_v, val_v, start_v, end_v, xt_v, ldx_v, b0_v, out_v, off_v, nv_v = args
        val_p = _ptr(context, builder, signature.args[1], val_v, _F32)
        xt_p = _ptr(context, builder, signature.args[4], xt_v, _F32)
        out_p = _ptr(context, builder, signature.args[7], out_v, _F32)
        vec = ir.VectorType(_F32, 16)

        def emit(nv: int) -> None:
            zero = ir.Constant(vec, [0.0] * 16)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in range(2)]

            def step(p: ir.Value, acc: list) -> None:
                k = _index(context, builder, signature.args[0], idx_v, p)
                w = _splat(builder, vec, builder.load(builder.gep(val_p, [p])))
                base = builder.add(builder.mul(k, ldx_v), b0_v)
                for j in range(nv):
                    xv = _load_vec(builder, xt_p, builder.add(base, _c64(16 * j)), vec)
                    builder.store(_fma(builder, w, xv, builder.load(acc[j])), acc[j])

            pairs = builder.sdiv(builder.sub(end_v, start_v), _c64(2))
            with _for(builder, _c64(0), pairs) as (i, _):
                p = builder.add(start_v, builder.mul(i, _c64(2)))
                step(p, accs[0])
                step(builder.add(p, _c64(1)), accs[1])
            last = builder.add(start_v, builder.mul(pairs, _c64(2)))
            with _for(builder, last, end_v) as (p, _):
                step(p, accs[0])
            for j in range(nv):
                total = builder.fadd(builder.load(accs[0][j]), builder.load(accs[1][j]))
                dst = builder.bitcast(builder.gep(out_p, [builder.add(off_v, _c64(16 * j))]), vec.as_pointer())
                builder.store(total, dst, align=4)

        _switch(builder, nv_v, {n: (lambda n=n: emit(n)) for n in range(1, 5)})
        return context.get_dummy_value()

    return sig, codegen


def _block_dot(name: str, elt_in: ir.Type, widths: tuple[int, ...], lanes_of: Callable[[int], ir.VectorType],
               mac: Callable, add: Callable, out_elt: ir.Type, load_of: Callable[[int], ir.VectorType] | None = None):
    """Build a ``bsr_dot``-style intrinsic: vector of block inputs times vector of block weights, hsum per row.
    ``lanes_of(width)`` is the accumulator vector, ``load_of(width)`` (default: the same) the loaded one."""
    load_of = load_of or lanes_of

    @intrinsic
    def kernel(typingctx, idx, val, start, end, x, ldx, mr, width, out, out_off, ldo):
        sig = types.void(idx, val, types.intp, types.intp, x, types.intp, types.intp, types.intp, out,
                         types.intp, types.intp)

        def codegen(context, builder, signature, args):
            idx_v, val_v, start_v, end_v, x_v, ldx_v, mr_v, width_v, out_v, off_v, ldo_v = args
            val_p = _ptr(context, builder, signature.args[1], val_v, elt_in)
            x_p = _ptr(context, builder, signature.args[4], x_v, elt_in)
            out_p = _ptr(context, builder, signature.args[8], out_v, out_elt)

            def emit(mr: int, width: int) -> None:
                vec = lanes_of(width)
                ld = load_of(width)
                zero = ir.Constant(vec, [0] * vec.count if isinstance(vec.element, ir.IntType) else [0.0] * vec.count)
                accs = [cgutils.alloca_once_value(builder, zero) for _ in range(mr)]
                with _for(builder, start_v, end_v) as (p, _):
                    kb = builder.mul(_index(context, builder, signature.args[0], idx_v, p), _c64(width))
                    w = _load_vec(builder, val_p, builder.mul(p, _c64(width)), ld)
                    for t in range(mr):
                        xv = _load_vec(builder, x_p, builder.add(kb, builder.mul(ldx_v, _c64(t))), ld)
                        builder.store(mac(builder, builder.load(accs[t]), xv, w), accs[t])
                for t in range(mr):
                    s = _hsum(builder, builder.load(accs[t]), lambda a, b: add(builder, a, b))
                    builder.store(s, builder.gep(out_p, [builder.add(off_v, builder.mul(ldo_v, _c64(t)))]))

            key = builder.add(builder.mul(mr_v, _c64(256)), width_v)
            _switch(builder, key, {m * 256 + w: (lambda m=m, w=w: emit(m, w))
                                   for m in range(1, MAX_MR + 1) for w in widths})
            return context.get_dummy_value()

        return sig, codegen

    kernel.__name__ = name
    return kernel


bsr_dot_f32 = _block_dot(
    "bsr_dot_f32", _F32, F32_WIDTHS, lambda w: ir.VectorType(_F32, w),
    lambda b, acc, xv, w: _fma(b, xv, w, acc), lambda b, x, y: b.fadd(x, y), _F32,
)
bsr_dot_f32.__doc__ = "fp32 ``width``x1 blocks (width 4/8/16), ``mr`` (1..4) rows; see the module docstring."

bsr_dot_vnni = _block_dot(
    "bsr_dot_vnni", _I8, VNNI_WIDTHS, lambda w: ir.VectorType(_I32, w // 4),
    lambda b, acc, xv, w: _vnni(b, acc, xv, w), lambda b, x, y: b.add(x, y), _I32,
)
bsr_dot_vnni.__doc__ = ("int8 ``width``x1 blocks (width 16/32/64 bytes): u8 ``x`` times s8 ``val`` into int32 "
                        "``out``, ``mr`` (1..4) rows. AVX512_VNNI only.")


def _bcast_codegen(elt: ir.Type, acc_elt: ir.Type, madd: Callable, madd_pair: Callable | None = None):
    """Codegen of a broadcast block kernel over ``elt`` values/activations accumulating in ``acc_elt`` lanes;
    ``madd(builder, x_scalar, w_vec, acc_vec)`` is the multiply-add (``x`` and ``w`` as loaded). With
    ``madd_pair(builder, xa, xb, w_pair, acc_vec)`` (``w_pair``: the two weight rows, loaded as one vector), two
    inputs are multiplied at once: the two of a block with ``r`` even, two blocks in a row with ``r == 1``."""

    def codegen(context, builder, signature, args):
        idx_v, val_v, start_v, end_v, x_v, ldx_v, mr_v, r_v, width_v, out_v, off_v, ldo_v = args
        val_p = _ptr(context, builder, signature.args[1], val_v, elt)
        x_p = _ptr(context, builder, signature.args[4], x_v, elt)
        out_p = _ptr(context, builder, signature.args[9], out_v, acc_elt)

        def emit(mr: int, width: int) -> None:
            vec = ir.VectorType(acc_elt, width)
            zero = ir.Constant(vec, [0] * width if isinstance(acc_elt, ir.IntType) else [0.0] * width)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(mr)]

            def x_at(k: ir.Value, t: int) -> ir.Value:
                return builder.load(builder.gep(x_p, [builder.add(k, builder.mul(ldx_v, _c64(t)))]))

            def single(k: ir.Value, w_off: ir.Value) -> None:
                w = _load_vec(builder, val_p, w_off, ir.VectorType(elt, width))
                for t in range(mr):
                    builder.store(madd(builder, x_at(k, t), w, builder.load(accs[t])), accs[t])

            def pair(ka: ir.Value, kb: ir.Value, w_off: ir.Value) -> None:
                w = _load_vec(builder, val_p, w_off, ir.VectorType(elt, 2 * width))
                for t in range(mr):
                    builder.store(madd_pair(builder, x_at(ka, t), x_at(kb, t), w, builder.load(accs[t])), accs[t])

            def kidx(p: ir.Value) -> ir.Value:
                return _index(context, builder, signature.args[0], idx_v, p)

            def blocks_one_by_one(step: int) -> None:
                # every block's r inputs, ``step`` (1 or 2) at a time
                with _for(builder, start_v, end_v) as (p, _):
                    k0 = builder.mul(kidx(p), r_v)
                    w0 = builder.mul(builder.mul(p, r_v), _c64(width))
                    with _for(builder, _c64(0), builder.sdiv(r_v, _c64(step))) as (h, _):
                        i = builder.mul(h, _c64(step))
                        k, w_off = builder.add(k0, i), builder.add(w0, builder.mul(i, _c64(width)))
                        if step == 1:
                            single(k, w_off)
                        else:
                            pair(k, builder.add(k, _c64(1)), w_off)

            def blocks_in_pairs() -> None:
                # r == 1: blocks p and p + 1 are one input each, their weight rows adjacent in ``val``
                pairs = builder.sdiv(builder.sub(end_v, start_v), _c64(2))
                with _for(builder, _c64(0), pairs) as (h, _):
                    p = builder.add(start_v, builder.mul(h, _c64(2)))
                    pair(kidx(p), kidx(builder.add(p, _c64(1))), builder.mul(p, _c64(width)))
                with _for(builder, builder.add(start_v, builder.mul(pairs, _c64(2))), end_v) as (p, _):
                    single(kidx(p), builder.mul(p, _c64(width)))

            if madd_pair is None:
                blocks_one_by_one(1)
            else:
                r_is_1 = builder.icmp_signed("==", r_v, _c64(1))
                r_even = builder.icmp_signed("==", builder.srem(r_v, _c64(2)), _c64(0))
                with builder.if_else(r_is_1) as (then, otherwise):
                    with then:
                        blocks_in_pairs()
                    with otherwise:
                        with builder.if_else(r_even) as (even, odd):
                            with even:
                                blocks_one_by_one(2)
                            with odd:
                                blocks_one_by_one(1)
            for t in range(mr):
                dst = builder.gep(out_p, [builder.add(off_v, builder.mul(ldo_v, _c64(t)))])
                builder.store(builder.load(accs[t]), builder.bitcast(dst, vec.as_pointer()), align=4)

        key = builder.add(builder.mul(mr_v, _c64(256)), width_v)
        _switch(builder, key, {m * 256 + w: (lambda m=m, w=w: emit(m, w))
                               for m in range(1, MAX_MR + 1) for w in F32_WIDTHS})
        return context.get_dummy_value()

    return codegen


def _madd_f32(builder: ir.IRBuilder, xs: ir.Value, w: ir.Value, acc: ir.Value) -> ir.Value:
    return _fma(builder, _splat(builder, acc.type, xs), w, acc)


def _madd_i8(builder: ir.IRBuilder, xs: ir.Value, w: ir.Value, acc: ir.Value) -> ir.Value:
    # sign-extended int8 x int8 products summed in int32: exact for any realistic block count
    wide = builder.sext(w, acc.type)
    return builder.add(builder.mul(_splat(builder, acc.type, builder.sext(xs, _I32)), wide), acc)


def _madd_i8_pair(builder: ir.IRBuilder, xa: ir.Value, xb: ir.Value, w: ir.Value, acc: ir.Value) -> ir.Value:
    # w: the weight rows of inputs a and b (``width`` int8 each), each sign-extended to int16, then interleaved per
    # output into (a, b) pairs, 8 outputs per pmaddwd; the activations go in as one (xa, xb) int16 pair splat over
    # the lanes, and pmaddwd adds the two exact products of each output
    width = acc.type.count
    v16 = ir.VectorType(_I16, width)

    def row(h: int) -> ir.Value:
        part = ir.Constant(ir.VectorType(_I32, width), list(range(h * width, (h + 1) * width)))
        return builder.sext(builder.shuffle_vector(w, w, part), v16)

    wa, wb = row(0), row(1)
    lanes = min(width, 8)
    # the pair as one i32 built with scalar operations (LLVM splats a <2 x i16> vector with one insert per lane)
    word = builder.or_(builder.zext(builder.sext(xa, _I16), _I32),
                       builder.shl(builder.zext(builder.sext(xb, _I16), _I32), ir.Constant(_I32, 16)))
    xs = builder.bitcast(_splat(builder, ir.VectorType(_I32, lanes), word), ir.VectorType(_I16, 2 * lanes))
    sums = []
    for h in range(0, width, lanes):
        mix = ir.Constant(ir.VectorType(_I32, 2 * lanes), [h + j + s * width for j in range(lanes) for s in (0, 1)])
        sums.append(pmaddwd_wide(builder, xs, builder.shuffle_vector(wa, wb, mix)))
    total = sums[0] if len(sums) == 1 else builder.shuffle_vector(
        sums[0], sums[1], ir.Constant(ir.VectorType(_I32, width), list(range(width))))
    return builder.add(acc, total)


def _bcast_sig(idx, val, x, out):
    return types.void(idx, val, types.intp, types.intp, x, types.intp, types.intp, types.intp, types.intp, out,
                      types.intp, types.intp)


@intrinsic
def bsr_bcast_f32(typingctx, idx, val, start, end, x, ldx, mr, r, width, out, out_off, ldo):
    """fp32 ``r`` x ``width`` blocks (width 4/8/16 output lanes), ``mr`` (1..4) rows; see the module docstring."""
    return _bcast_sig(idx, val, x, out), _bcast_codegen(_F32, _F32, _madd_f32)


@intrinsic
def bsr_bcast_i8(typingctx, idx, val, start, end, x, ldx, mr, r, width, out, out_off, ldo):
    """int8 ``r`` x ``width`` blocks times int8 activations into exact int32 lanes (``bsr_bcast_f32``'s layout)."""
    return _bcast_sig(idx, val, x, out), _bcast_codegen(_I8, _I32, _madd_i8, _madd_i8_pair if has_avx2() else None)
