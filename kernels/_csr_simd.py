"""Integer and gather sparse micro-kernels (LLVM vector IR via ``numba.core.extending.intrinsic``).

Companions of ``_sparse_simd`` (same conventions: one sparse row per call, stored range ``[start, end)``,
offsets in elements, uint16 or uint32 index arrays, accumulators ``alloca``'d so LLVM keeps them in registers).
Everything here is plain LLVM IR (``llvm.masked.gather``, ``sext``/``mul``/``add``): no VNNI, so it runs on any
x86-64 host; on AVX-512 it lowers to ``vgatherdps``/``vpgatherdd`` and ``vpmaddwd``/``vpmulld``-class code.

* ``csr_gather_dot``: batch 1. ``sum_p val[p] * x[x_off + idx[p]]`` for one output, 16 nonzeros per step: the
  16 ``x`` values are gathered with one ``vgatherdps`` (fp32) / ``vpgatherdd`` (int) (``x`` is L1/L2 resident:
  16 KB for K = 4096), two independent accumulators, a tree reduction at the end and a scalar tail. fp32 with
  fp32 ``x``, or int8 ``val`` with int16 ``x`` (8 KB for K = 4096; one spare element at the end, as the
  gather reads 32-bit words at 2-byte steps) and an exact int32 sum.
* ``lanes_i32``: batch >= 2, int8 weights. ``out[out_off + j] += ...`` for ``j < nv*16`` batch lanes:
  ``sum_p sum_{i<r} val[p*r + i] * xT[(idx[p]*r + i) * ldx + b0 + j]`` with ``xT`` the transposed int16
  activations (exact int32). ``r == 1`` is CSR, ``r > 1`` (even) are ``(r, 1)`` blocks (the portable ``bsr_int8``
  path). With AVX2 and two or more lane vectors, stored weights go in pairs: the two activation rows are interleaved (``vpunpck[lh]wd``, within
  128-bit lanes, so the batch lanes come out permuted and are put back in order once, at the store) and
  ``pmaddwd`` multiplies both by the weight pair and adds them, 16 products per instruction; elsewhere each weight
  feeds the lanes with a sign-extending 32-bit multiply-add.
* ``bsr_dot_i8``: ``(r, 1)`` int8 block dot without VNNI (``r`` in 4..64 bytes) for ``mr`` (1..4) rows, int32
  lanes: ``pmaddwd`` on sign-extended int16 pairs with AVX2 (``r >= 16``), else 32-bit multiply-adds.
"""

from __future__ import annotations

import llvmlite.ir as ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from leanserve.kernels._simd import has_avx2, pmaddwd
from leanserve.kernels._sparse_simd import (MAX_MR, _F32, _I32, _I64, _block_dot, _c64, _for, _hsum, _index, _load_vec,
                                  _ptr, _splat, _switch)

__all__ = ["bsr_dot_i8", "csr_gather_dot", "lanes_i32", "INT8_DOT_WIDTHS"]

INT8_DOT_WIDTHS = (4, 8, 16, 32, 64)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I1 = ir.IntType(1)


def _gather(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, elt: ir.Type, align: int = 4) -> ir.Value:
    """``elt`` loads at ``&base[index[j]]`` for a ``<16 x i32>`` index vector (vector GEP -> ``llvm.masked.gather``;
    ``base`` may have a narrower element than ``elt``: the address scale follows ``base``)."""
    vec = ir.VectorType(elt, 16)
    gep = builder.gep(base, [ir.Constant(_I32, 0)])
    gep.operands[1] = index  # llvmlite cannot build a vector-index GEP directly; patch the scalar one
    gep.indices = [index]
    gep.type = ir.VectorType(base.type, 16)
    mask = ir.VectorType(_I1, 16)
    suffix = "f32" if isinstance(elt, ir.FloatType) else "i32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [gep.type, _I32, mask, vec]),
                                        f"llvm.masked.gather.v16{suffix}.v16p0")
    return builder.call(fn, [gep, ir.Constant(_I32, align), ir.Constant(mask, [1] * 16),
                             ir.Constant(vec, ir.Undefined)])


@intrinsic
def csr_gather_dot(typingctx, idx, val, start, end, x, x_off):
    """One output of a batch-1 CSR row: fp32 (``val``, ``x`` float32) or int (``val`` int8, ``x`` int16)."""
    is_float = isinstance(val.dtype, types.Float)
    ret = types.float32 if is_float else types.int32
    sig = ret(idx, val, types.intp, types.intp, x, types.intp)

    def codegen(context, builder, signature, args):
        idx_v, val_v, start_v, end_v, x_v, off_v = args
        elt = _F32 if is_float else _I32
        xelt = _F32 if is_float else _I16
        vec = ir.VectorType(elt, 16)
        ity = context.get_data_type(signature.args[0].dtype)
        idx_p = _ptr(context, builder, signature.args[0], idx_v, ity)
        val_p = _ptr(context, builder, signature.args[1], val_v, _F32 if is_float else _I8)
        x_p = builder.gep(_ptr(context, builder, signature.args[4], x_v, xelt), [off_v])
        zero = ir.Constant(vec, [0.0 if is_float else 0] * 16)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(2)]

        def mac(prod_acc, a, b):
            if is_float:
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), "llvm.fma.v16f32")
                return builder.call(fn, [a, b, prod_acc])
            return builder.add(prod_acc, builder.mul(a, b))

        def step(p: ir.Value, acc) -> None:
            iv = _load_vec(builder, idx_p, p, ir.VectorType(ity, 16))
            if ity.width < 32:
                iv = builder.zext(iv, ir.VectorType(_I32, 16))
            xv = _gather(builder, x_p, iv, elt, 4 if is_float else 2)
            if not is_float:  # 32-bit words at 2-byte steps: keep the low int16 (x[k]), sign-extended
                sh = ir.Constant(vec, [16] * 16)
                xv = builder.ashr(builder.shl(xv, sh), sh)
            if is_float:
                wv = _load_vec(builder, val_p, p, vec)
            else:
                wv = builder.sext(_load_vec(builder, val_p, p, ir.VectorType(_I8, 16)), vec)
            builder.store(mac(builder.load(acc), wv, xv), acc)

        n32 = builder.sdiv(builder.sub(end_v, start_v), _c64(32))
        with _for(builder, _c64(0), n32) as (i, _):
            p = builder.add(start_v, builder.mul(i, _c64(32)))
            step(p, accs[0])
            step(builder.add(p, _c64(16)), accs[1])
        p16 = builder.add(start_v, builder.mul(n32, _c64(32)))
        with builder.if_then(builder.icmp_signed("<=", builder.add(p16, _c64(16)), end_v)):
            step(p16, accs[0])
        rest = builder.add(start_v, builder.mul(builder.sdiv(builder.sub(end_v, start_v), _c64(16)), _c64(16)))
        tot = (builder.fadd if is_float else builder.add)(builder.load(accs[0]), builder.load(accs[1]))
        s = cgutils.alloca_once_value(builder, _hsum(builder, tot, builder.fadd if is_float else builder.add))
        with _for(builder, rest, end_v) as (p, _):
            k = builder.zext(builder.load(builder.gep(idx_p, [p])), _I64)
            xs = builder.load(builder.gep(x_p, [k]))
            w = builder.load(builder.gep(val_p, [p]))
            if is_float:
                builder.store(builder.fadd(builder.load(s), builder.fmul(w, xs)), s)
            else:
                prod = builder.mul(builder.sext(w, _I32), builder.sext(xs, _I32))
                builder.store(builder.add(builder.load(s), prod), s)
        return builder.load(s)

    return sig, codegen


@intrinsic
def lanes_i32(typingctx, idx, val, start, end, r, xT, ldx, b0, out, out_off, nv):
    """int8 weights x int16 transposed activations over ``nv * 16`` (1..4) batch lanes; see the module docstring.
    Writes (does not add to) ``out[out_off : out_off + nv*16]`` (int32)."""
    sig = types.void(idx, val, types.intp, types.intp, types.intp, xT, types.intp, types.intp, out, types.intp,
                     types.intp)

    def codegen(context, builder, signature, args):
        idx_v, val_v, start_v, end_v, r_v, xt_v, ldx_v, b0_v, out_v, off_v, nv_v = args
        val_p = _ptr(context, builder, signature.args[1], val_v, _I8)
        xt_p = _ptr(context, builder, signature.args[5], xt_v, _I16)
        out_p = _ptr(context, builder, signature.args[8], out_v, _I32)
        vec = ir.VectorType(_I32, 16)
        v16 = ir.VectorType(_I16, 16)

        def kidx(p: ir.Value) -> ir.Value:
            return _index(context, builder, signature.args[0], idx_v, p)

        def emit_madd(nv: int, blocked: bool) -> None:
            v8 = ir.VectorType(_I32, 8)
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8, [0] * 8)) for _ in range(2)]
                    for _ in range(nv)]
            # the interleave of two rows' 16 lanes, within each 128-bit half (one vpunpck[lh]wd each): pmaddwd of
            # ``lo`` gives batch lanes 0-3 and 8-11, of ``hi`` lanes 4-7 and 12-15
            lo = ir.Constant(ir.VectorType(_I32, 16), [0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27])
            hi = ir.Constant(ir.VectorType(_I32, 16), [4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31])
            order = ir.Constant(ir.VectorType(_I32, 16), [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])

            def weight16(e: ir.Value) -> ir.Value:
                return builder.zext(builder.sext(builder.load(builder.gep(val_p, [e])), _I16), _I32)

            def pair(ka: ir.Value, ea: ir.Value, kb: ir.Value, eb: ir.Value | None) -> None:
                word = weight16(ea)
                if eb is not None:
                    word = builder.or_(word, builder.shl(weight16(eb), ir.Constant(_I32, 16)))
                w = builder.bitcast(_splat(builder, v8, word), v16)
                base_a = builder.add(builder.mul(ka, ldx_v), b0_v)
                base_b = builder.add(builder.mul(kb, ldx_v), b0_v)
                for j in range(nv):
                    xa = _load_vec(builder, xt_p, builder.add(base_a, _c64(16 * j)), v16)
                    xb = _load_vec(builder, xt_p, builder.add(base_b, _c64(16 * j)), v16) if eb is not None else xa
                    for acc, mask in zip(accs[j], (lo, hi)):
                        prod = pmaddwd(builder, builder.shuffle_vector(xa, xb, mask), w)
                        builder.store(builder.add(builder.load(acc), prod), acc)

            if blocked:  # (r, 1) blocks, r even: consecutive inputs pair up
                with _for(builder, start_v, end_v) as (p, _):
                    k0 = builder.mul(kidx(p), r_v)
                    e0 = builder.mul(p, r_v)
                    with _for(builder, _c64(0), builder.sdiv(r_v, _c64(2))) as (h, _):
                        i = builder.mul(h, _c64(2))
                        i1 = builder.add(i, _c64(1))
                        pair(builder.add(k0, i), builder.add(e0, i), builder.add(k0, i1), builder.add(e0, i1))
            else:
                pairs = builder.sdiv(builder.sub(end_v, start_v), _c64(2))
                with _for(builder, _c64(0), pairs) as (i, _):
                    p = builder.add(start_v, builder.mul(i, _c64(2)))
                    p1 = builder.add(p, _c64(1))
                    pair(kidx(p), p, kidx(p1), p1)
                last = builder.add(start_v, builder.mul(pairs, _c64(2)))
                with builder.if_then(builder.icmp_signed("<", last, end_v)):
                    pair(kidx(last), last, kidx(last), None)
            for j in range(nv):
                total = builder.shuffle_vector(builder.load(accs[j][0]), builder.load(accs[j][1]), order)
                dst = builder.bitcast(builder.gep(out_p, [builder.add(off_v, _c64(16 * j))]), vec.as_pointer())
                builder.store(total, dst, align=4)

        def emit(nv: int, blocked: bool) -> None:
            zero = ir.Constant(vec, [0] * 16)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in range(2)]

            def step(k: ir.Value, e: ir.Value, acc: list) -> None:
                w = _splat(builder, vec, builder.sext(builder.load(builder.gep(val_p, [e])), _I32))
                base = builder.add(builder.mul(k, ldx_v), b0_v)
                for j in range(nv):
                    xv = builder.sext(_load_vec(builder, xt_p, builder.add(base, _c64(16 * j)), v16), vec)
                    builder.store(builder.add(builder.load(acc[j]), builder.mul(w, xv)), acc[j])

            if blocked:  # (r, 1) blocks, r even: alternate the accumulator sets inside a block
                with _for(builder, start_v, end_v) as (p, _):
                    k0 = builder.mul(kidx(p), r_v)
                    e0 = builder.mul(p, r_v)
                    with _for(builder, _c64(0), builder.sdiv(r_v, _c64(2))) as (h, _):
                        i = builder.mul(h, _c64(2))
                        step(builder.add(k0, i), builder.add(e0, i), accs[0])
                        i1 = builder.add(i, _c64(1))
                        step(builder.add(k0, i1), builder.add(e0, i1), accs[1])
            else:
                pairs = builder.sdiv(builder.sub(end_v, start_v), _c64(2))
                with _for(builder, _c64(0), pairs) as (i, _):
                    p = builder.add(start_v, builder.mul(i, _c64(2)))
                    step(kidx(p), p, accs[0])
                    p1 = builder.add(p, _c64(1))
                    step(kidx(p1), p1, accs[1])
                last = builder.add(start_v, builder.mul(pairs, _c64(2)))
                with _for(builder, last, end_v) as (p, _):
                    step(kidx(p), p, accs[0])
            for j in range(nv):
                total = builder.add(builder.load(accs[0][j]), builder.load(accs[1][j]))
                dst = builder.bitcast(builder.gep(out_p, [builder.add(off_v, _c64(16 * j))]), vec.as_pointer())
                builder.store(total, dst, align=4)

        key = builder.add(nv_v, builder.mul(builder.zext(builder.icmp_signed(">", r_v, _c64(1)), _I64), _c64(8)))
        # pairing costs a few scalar steps per two weights: it pays from two lane vectors (32 batch rows) on
        madd = has_avx2()
        _switch(builder, key, {n + 8 * b: (lambda n=n, b=b: (emit_madd if madd and n >= 2 else emit)(n, bool(b)))
                               for n in range(1, 5) for b in (0, 1)})
        return context.get_dummy_value()

    return sig, codegen


def _pmadd_blocks(width: int) -> bool:
    """Whether ``bsr_dot_i8`` multiplies blocks of ``width`` bytes with pmaddwd (AVX2, 16 bytes or more)."""
    return width >= 16 and has_avx2()


def _mac_i8(builder: ir.IRBuilder, acc: ir.Value, xv: ir.Value, w: ir.Value) -> ir.Value:
    n = xv.type.count
    if not _pmadd_blocks(n):
        return builder.add(acc, builder.mul(builder.sext(xv, acc.type), builder.sext(w, acc.type)))
    # int16 products summed in pairs into int32 (exact), 16 bytes per pmaddwd; the row is summed at the end, so
    # every 16-byte piece adds into the same 8 lanes
    wide = ir.VectorType(_I16, n)
    xs, ws = builder.sext(xv, wide), builder.sext(w, wide)
    for h in range(0, n, 16):
        piece = ir.Constant(ir.VectorType(_I32, 16), list(range(h, h + 16)))
        acc = builder.add(acc, pmaddwd(builder, builder.shuffle_vector(xs, xs, piece),
                                       builder.shuffle_vector(ws, ws, piece)))
    return acc


bsr_dot_i8 = _block_dot(
    "bsr_dot_i8", _I8, INT8_DOT_WIDTHS, lambda w: ir.VectorType(_I32, 8 if _pmadd_blocks(w) else w), _mac_i8,
    lambda b, x, y: b.add(x, y), _I32, load_of=lambda w: ir.VectorType(_I8, w),
)
bsr_dot_i8.__doc__ = ("int8 ``width``x1 blocks (width 4..64) without VNNI: s8 ``x`` times s8 ``val`` into int32 "
                      f"``out``, ``mr`` (1..{MAX_MR}) rows; pmaddwd on AVX2 from 16 bytes, else sign-extending "
                      "32-bit multiply-adds.")
