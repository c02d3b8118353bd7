"""Register-tiled micro-kernels emitted as LLVM vector IR through ``numba.core.extending.intrinsic``.

Numba cannot keep a tile of accumulators in vector registers on its own (its arrays live on the heap), so the
inner loops of the dense kernels are generated here: accumulators are ``alloca``'d vectors (LLVM promotes them
to registers), each k step loads ``nv`` weight vectors of 16 lanes once and reuses them for ``mr`` rows.

Weights are packed in panels of up to 64 output channels: panel ``p`` holds, for each k, its ``nv * 16``
channel values contiguously (see ``pack_panels``), so the k loop streams one contiguous buffer.

* ``f32_tile``: fp32 FMA (``llvm.fma.v16f32``); portable LLVM IR, lowered to whatever vector ISA the host has.
* ``vnni_tile``: int8 dot products with ``llvm.x86.avx512.vpdpbusd.512`` (u8 x s8 -> i32, 4 k's per 32-bit
  lane); only compile functions that use it on a CPU with AVX512_VNNI (``has_avx512_vnni``).
* ``madd_tile``: int8 dot products without VNNI: weights sign-extended to int16 as they are loaded, activations
  held as int16 pairs, ``llvm.x86.avx2.pmadd.wd`` (s16 x s16, adjacent pairs summed into i32: exact, unlike the
  saturating u8 x s8 ``pmaddubsw``); 2 k's per 32-bit lane; needs AVX2 (``has_avx2``).
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

LANES = 16  # 32-bit lanes per 512-bit vector
MAX_MR = 4  # rows per tile
MAX_NV = 4  # vectors (of 16 channels) per tile -> panels of 64 channels
PANEL = LANES * MAX_NV

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _host_has(*features: str) -> bool:
    """True if the host CPU, as LLVM sees it (i.e. what Numba compiles for), has every one of ``features``."""
    import llvmlite.binding as ll

    host = ll.get_host_cpu_features()
    return all(bool(host.get(name, False)) for name in features)


def has_avx2() -> bool:
    """True if the host CPU has AVX2 (integer operations on 256-bit vectors, e.g. ``pmaddwd``)."""
    return _host_has("avx2")


def has_avx512f() -> bool:
    """True if the host CPU has AVX-512F: 32 vector registers of 16 float32 lanes."""
    return _host_has("avx512f")


#: tile widths (vectors of 16 lanes) per tile height on AVX2: the accumulators fit its 16 registers (fp32 and the
#: int8 pmaddwd tiles alike)
AVX2_TILE_NV = (0, 4, 2, 1, 1)


def _f32_layout() -> tuple[int, tuple[int, ...]]:
    """``(F32_PANEL, F32_TILE_NV)`` for this host: fp32 panel width and, per tile height ``mr``, the tile's vectors.

    The tile's accumulators must stay in registers. AVX-512 (32 registers of 16 lanes): 64-channel panels and a
    4 x 64 tile (16 accumulators). AVX2 (16 registers of 8 lanes, two per 16-lane vector): that tile would spill, so
    panels of 16 channels and tiles of 4 rows x 16 channels, 2 x 32 or 1 x 64 (at most 8 registers of accumulators);
    a tile wider than a panel reads one panel per vector, so each stream of weights stays contiguous.
    """
    return (PANEL, (0, 4, 4, 4, 4)) if has_avx512f() else (LANES, AVX2_TILE_NV)


#: see ``_f32_layout``; module globals, so Numba compiles them in as constants
F32_PANEL, F32_TILE_NV = _f32_layout()


def has_avx512_vnni() -> bool:
    """True if the host CPU (as LLVM sees it, i.e. what Numba compiles for) has AVX512_VNNI."""
    return _host_has("avx512vnni", "avx512f")


def pack_panels(w: np.ndarray, group: int = 1, panel: int = PANEL) -> np.ndarray:
    """Pack ``w[K, N]`` into the panel layout the tiles stream (flat, zero padded).

    Panels of ``panel`` channels (64, or 16 for ``F32_PANEL`` on AVX2; the last one of ``ceil(rest / 16) * 16``);
    inside a panel, for each k-group of ``group`` rows, the ``group`` values of channel 0, then channel 1, ...
    (``group=4`` is vpdpbusd's layout: one 32-bit lane holds 4 consecutive k's of one channel). ``K`` must be a
    multiple of ``group``.
    """
    K, N = w.shape
    assert K % group == 0
    out = []
    for n0 in range(0, N, panel):
        width = min(panel, N - n0)
        padded = -(-width // LANES) * LANES
        block = np.zeros((K // group, padded, group), dtype=w.dtype)
        block[:, :width, :] = w[:, n0 : n0 + width].reshape(K // group, group, width).transpose(0, 2, 1)
        out.append(block.reshape(-1))
    if not out:
        return np.zeros(0, dtype=w.dtype)
    return np.ascontiguousarray(np.concatenate(out))


def _splat(builder: ir.IRBuilder, vec: ir.VectorType, scalar: ir.Value) -> ir.Value:
    undef = ir.Constant(vec, ir.Undefined)
    first = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _emit_tile(context, builder, elt, w_elt, op, a_ptr, a_off, lda, w_ptr, w_off, ldw, vstride, c_ptr, kdim, mr,
               nv):
    """One mr x (nv*16) tile: c[r*nv*16 + 16*v + i] = sum_k op(a[a_off + r*lda + k], w[w_off + v*vstride + k*ldw + i])
    (vector ``v`` of the tile starts ``vstride`` elements after the previous one: 16 inside one panel, a whole
    panel when each vector is a panel of its own). ``a`` and ``c`` hold ``elt`` values, ``w`` holds ``w_elt``."""
    vec = ir.VectorType(elt, LANES)
    vptr = vec.as_pointer()
    wptr = ir.VectorType(w_elt, LANES).as_pointer()
    w_align = 2 if w_elt == ir.IntType(16) else 4
    zero = ir.Constant(vec, [0.0 if isinstance(elt, ir.FloatType) else 0] * LANES)
    accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in range(mr)]
    with cgutils.for_range(builder, kdim) as loop:
        k = loop.index
        wbase = builder.add(w_off, builder.mul(k, ldw))
        wv = []
        for j in range(nv):
            offset = builder.add(wbase, builder.mul(vstride, ir.Constant(_I64, j)))
            p = builder.gep(w_ptr, [offset])
            wv.append(builder.load(builder.bitcast(p, wptr), align=w_align))
        for r in range(mr):
            idx = builder.add(builder.add(a_off, builder.mul(lda, ir.Constant(_I64, r))), k)
            b = _splat(builder, vec, builder.load(builder.gep(a_ptr, [idx])))
            for j in range(nv):
                builder.store(op(builder, b, wv[j], builder.load(accs[r][j])), accs[r][j])
    for r in range(mr):
        for j in range(nv):
            p = builder.gep(c_ptr, [ir.Constant(_I64, (r * nv + j) * LANES)])
            builder.store(builder.load(accs[r][j]), builder.bitcast(p, vptr), align=4)


def _fma_op(builder, b, w, acc):
    vec = acc.type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")
    return builder.call(fn, [b, w, acc])


def _vnni_op(builder, b, w, acc):
    vec = acc.type
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.x86.avx512.vpdpbusd.512"
    )
    return builder.call(fn, [acc, b, w])  # b: unsigned bytes (activations), w: signed bytes (weights)


def pmaddwd(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """AVX2 ``pmaddwd``: two <16 x i16> -> <8 x i32>, each lane the exact sum of two adjacent int16 products."""
    v16 = ir.VectorType(ir.IntType(16), 16)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VectorType(_I32, 8), [v16, v16]),
                                        "llvm.x86.avx2.pmadd.wd")
    return builder.call(fn, [a, b])


def pmaddwd_wide(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """``pmaddwd`` over two <2n x i16> (n = 4, 8, 16, ...) -> <n x i32>: AVX2's 8-lane instruction on each 16-lane
    piece (SSE2's 4-lane one for n = 4), the results concatenated in order."""
    count = a.type.count
    if count == 8:
        v8 = ir.VectorType(ir.IntType(16), 8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VectorType(_I32, 4), [v8, v8]),
                                            "llvm.x86.sse2.pmadd.wd")
        return builder.call(fn, [a, b])
    pieces = []
    for h in range(0, count, 16):
        piece = ir.Constant(ir.VectorType(_I32, 16), list(range(h, h + 16)))
        pieces.append(pmaddwd(builder, builder.shuffle_vector(a, a, piece), builder.shuffle_vector(b, b, piece)))
    while len(pieces) > 1:  # concatenate pairwise: shufflevector joins two vectors of equal length
        n = pieces[0].type.count
        both = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
        pieces = [builder.shuffle_vector(pieces[i], pieces[i + 1], both) for i in range(0, len(pieces), 2)]
    return pieces[0]


def _madd_op(builder, b, w, acc):
    # b: an (x[k], x[k+1]) int16 pair splat over 16 i32 lanes; w: 16 channels x (w[k], w[k+1]) as int8 pairs.
    wide = ir.VectorType(ir.IntType(16), 2 * LANES)
    w16 = builder.sext(builder.bitcast(w, ir.VectorType(ir.IntType(8), 2 * LANES)), wide)
    return builder.add(acc, pmaddwd_wide(builder, builder.bitcast(b, wide), w16))


def _make_tile(elt_factory, op, doc, w_elt_factory=None):
    @intrinsic
    def tile(typingctx, a, a_off, lda, w, w_off, ldw, vstride, c, kdim, mr, nv):
        sig = types.void(a, types.intp, types.intp, w, types.intp, types.intp, types.intp, c, types.intp, types.intp,
                         types.intp)

        def codegen(context, builder, signature, args):
            elt = elt_factory()
            w_elt = w_elt_factory() if w_elt_factory is not None else elt
            a_arr, a_off_v, lda_v, w_arr, w_off_v, ldw_v, vstride_v, c_arr, kdim_v, mr_v, nv_v = args
            ptrs = [
                builder.bitcast(context.make_array(ty)(context, builder, val).data, t.as_pointer())
                for ty, val, t in ((signature.args[0], a_arr, elt), (signature.args[3], w_arr, w_elt),
                                   (signature.args[7], c_arr, elt))
            ]
            key = builder.add(builder.mul(mr_v, ir.Constant(_I64, 8)), nv_v)
            done = builder.append_basic_block("tile.done")
            switch = builder.switch(key, done)
            for m in range(1, MAX_MR + 1):
                for n in range(1, MAX_NV + 1):
                    case = builder.append_basic_block(f"tile.{m}x{n}")
                    switch.add_case(ir.Constant(_I64, m * 8 + n), case)
                    builder.position_at_end(case)
                    _emit_tile(context, builder, elt, w_elt, op, ptrs[0], a_off_v, lda_v, ptrs[1], w_off_v, ldw_v,
                               vstride_v, ptrs[2], kdim_v, m, n)
                    builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    tile.__doc__ = doc
    return tile


f32_tile = _make_tile(
    ir.FloatType,
    _fma_op,
    """fp32 tile: ``c[r*nv*16 + 16*v + i] = sum_k a[a_off + r*lda + k] * w[w_off + v*vstride + k*ldw + i]`` for
    r < mr, v < nv, i < 16: ``ldw`` is the panel's width (its k stride), ``vstride`` 16 for vectors of one panel or
    the panel size for one vector per panel (``F32_PANEL`` = 16).

    ``a``, ``w``, ``c`` are float32 arrays (only their data pointers are used; offsets in elements);
    ``1 <= mr <= 4``, ``1 <= nv <= 4``; ``c`` must hold ``mr * nv * 16`` values.""",
)

vnni_tile = _make_tile(
    lambda: _I32,
    _vnni_op,
    """VNNI int8 tile, same shape as ``f32_tile`` over int32 words: ``a`` holds u8 activations viewed as int32
    (4 k's per word), ``w`` s8 weights packed with ``pack_panels(group=4)`` viewed as int32 (``ldw`` the panel's
    width in words, ``vstride`` 16), ``kdim = Kp / 4``; ``c`` (int32) receives ``sum_k u8 * s8`` per channel.""",
)

madd_tile = _make_tile(
    lambda: _I32,
    _madd_op,
    """AVX2 int8 tile, same shape as ``f32_tile``: ``a`` holds int16 activations viewed as int32 words (2 k's per
    word), ``w`` s8 weights packed with ``pack_panels(group=2)`` viewed as int16 (one channel's 2 k's per element;
    ``ldw`` the panel's width, ``vstride`` as ``f32_tile``), ``kdim = Kp / 2``; ``c`` (int32) receives the exact
    ``sum_k x * w`` per channel (each product pair is at most 2 * 127 * 127, far inside int32).""",
    lambda: ir.IntType(16),
)


def unpack_panels(packed: np.ndarray, k: int, n: int, group: int = 1, panel: int = PANEL) -> np.ndarray:
    """Inverse of ``pack_panels``: the ``[k, n]`` matrix (``k`` a multiple of ``group``)."""
    w = np.empty((k, n), dtype=packed.dtype)
    off = 0
    for n0 in range(0, n, panel):
        width = min(panel, n - n0)
        padded = -(-width // LANES) * LANES
        block = packed[off : off + k * padded].reshape(k // group, padded, group)
        w[:, n0 : n0 + width] = block[:, :width, :].transpose(0, 2, 1).reshape(k, width)
        off += k * padded
    return w
