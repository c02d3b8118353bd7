"""Side-by-side kernel benchmark: leanserve formats vs numpy, scipy.sparse, onnxruntime and TensorFlow.

Every kernel computes ``x @ W + b`` (linear activation) on the same inputs, single-threaded everywhere (numpy via
threadpoolctl, ORT intra/inter_op_num_threads=1, TF intra/inter op threads=1): the server runs one kernel call
per gRPC worker thread, so per-call single-core speed is what matters, and it is the only fair comparison.

Ratios are *speedups*: ``reference seconds / kernel seconds`` (> 1 = the kernel is faster), against numpy fp32 and
against the best peer (fastest non-leanserve entry on the same shape, batch and sparsity). A last section runs the
seed MLP whole: leanserve's fused fp32 chain, the same layers one call each, numpy, and ORT running the graph.
Batch-1 rows also
report ``weight bytes / time / measured read bandwidth``: above 1.0 means the weights were served from cache
(L3 is 32 MB here, so int8 4096x4096 = 16 MB fits while fp32 = 64 MB does not).

    .venv/bin/python bench/kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from leanserve.kernels import available_formats, get_format  # noqa: E402
from leanserve.kernels import quantize_weights_per_channel  # noqa: E402
from whole_model import print_model, run_model  # noqa: E402  (bench/ is on sys.path: this script's folder)

RESULTS = ROOT / "bench" / "results"
SHAPES = [(1000, 128), (128, 64), (64, 10), (768, 3072), (3072, 768), (4096, 4096)]
BATCHES = [1, 8, 32, 128]
SPARSITIES = [0.5, 0.8, 0.9, 0.95]
QUICK_SHAPES = [(1000, 128), (128, 64), (768, 3072), (4096, 4096)]
QUICK_BATCHES = [1, 32]
QUICK_SPARSITIES = [0.9]
#: (inputs, outputs) per block for each bsr_* format (its default) and the matching block pruning
BSR_BLOCKS = {"bsr_f32": (1, 16), "bsr_int8": (16, 1)}
PORTABLE_BSR_BLOCK = (8, 1)
DENSE_FORMATS = [("dense_f32", {}), ("int8", {}), ("int8", {"path": "portable"})]


@dataclass
class Record:
    kernel: str
    kind: str  # "leanserve" or "peer"
    shape: tuple[int, int]
    batch: int
    sparsity: float
    median_s: float
    weight_bytes: int
    ratio_numpy: float = float("nan")
    ratio_best_peer: float = float("nan")
    best_peer: str = ""
    bandwidth_fraction: float | None = None


def median_seconds(fn: Callable[[], object], budget: float) -> float:
    """Median seconds per call; each sample repeats ``fn`` to last >= 200 us; samples fill ``budget`` seconds."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(200e-6 / once))
    samples: list[float] = []
    end = time.perf_counter() + budget
    while len(samples) < 5 or (time.perf_counter() < end and len(samples) < 200):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return float(np.median(samples))


def measure_bandwidth() -> dict[str, float]:
    """Single-thread memory bandwidth (GB/s) on a 512 MB buffer: read (sum) and copy (read + write)."""
    a = np.ones(128 * 2**20, dtype=np.float32)
    b = np.empty_like(a)
    read = a.nbytes / min(_timeit(lambda: a.sum()) for _ in range(3))
    copy = 2 * a.nbytes / min(_timeit(lambda: np.copyto(b, a)) for _ in range(3))
    return {"read_GBps": read / 1e9, "copy_GBps": copy / 1e9}


def _timeit(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prune_magnitude(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the ``sparsity`` fraction of smallest-|w| entries."""
    cut = np.quantile(np.abs(w), sparsity)
    return np.where(np.abs(w) > cut, w, 0).astype(np.float32)


def prune_blocks(w: np.ndarray, sparsity: float, block: tuple[int, int]) -> np.ndarray:
    """Zero the ``sparsity`` fraction of ``block``-shaped tiles with the smallest L2 norm (edges padded)."""
    r, c = block
    K, N = w.shape
    kb, nb = -(-K // r), -(-N // c)
    padded = np.zeros((kb * r, nb * c), np.float32)
    padded[:K, :N] = w
    norms = np.sqrt((padded.reshape(kb, r, nb, c) ** 2).sum(axis=(1, 3)))
    keep = norms > np.quantile(norms, sparsity)
    mask = np.repeat(np.repeat(keep, r, axis=0), c, axis=1)[:K, :N]
    return np.where(mask, w, 0).astype(np.float32)


# ---- peers ---------------------------------------------------------------------------------------------------


def onnx_sessions(w: np.ndarray, b: np.ndarray) -> dict[str, tuple[Callable[[np.ndarray], object], int]]:
    """ORT fp32 (MatMul + Add) and int8 dynamic (DynamicQuantizeLinear + MatMulInteger) sessions, 1 thread."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    K, N = w.shape
    q, scales = quantize_weights_per_channel(w)
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])
    y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])
    fp32 = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "fp32", [x_in], [y_out], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    int8 = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
            helper.make_node("MatMulInteger", ["xq", "Wq", "xzp"], ["acc"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["xs", "ws"], ["s"]),
            helper.make_node("Mul", ["accf", "s"], ["deq"]),
            helper.make_node("Add", ["deq", "b"], ["y"]),
        ],
        "int8", [x_in], [y_out],
        [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(scales, "ws"), numpy_helper.from_array(b, "b")],
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    out = {}
    for name, graph, nbytes in (("ort_fp32", fp32, w.nbytes), ("ort_int8", int8, q.nbytes + scales.nbytes)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        out[name] = ((lambda x, s=sess: s.run(None, {"x": x})[0]), nbytes)
    return out


_tf = None


def tf_matmul(w: np.ndarray, b: np.ndarray) -> Callable[[np.ndarray], object]:
    """A ``tf.function`` computing ``x @ W + b`` (1 intra/inter-op thread), returning numpy."""
    global _tf
    if _tf is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        _tf = tf
    tf = _tf
    wt, bt = tf.constant(w), tf.constant(b)
    fn = tf.function(lambda x: tf.matmul(x, wt) + bt, input_signature=[tf.TensorSpec([None, w.shape[0]], tf.float32)])
    return lambda x: fn(x).numpy()


def scipy_csr(w: np.ndarray, b: np.ndarray) -> tuple[Callable[[np.ndarray], object], int]:
    """scipy CSR of ``W^T`` (sparse @ dense is scipy's fast direction); returns (fn, bytes)."""
    import scipy.sparse as sp

    wt = sp.csr_matrix(w.T)
    return (lambda x: (wt @ x.T).T + b), wt.data.nbytes + wt.indices.nbytes + wt.indptr.nbytes


# ---- runner --------------------------------------------------------------------------------------------------


def leanserve_kernel(fmt: str, options: dict, w: np.ndarray, b: np.ndarray):
    kernel = get_format(fmt).from_dense(w, b, "linear", **options)
    kernel.warmup((1,))
    return kernel


def label(fmt: str, options: dict) -> str:
    return fmt + ("" if not options else "[" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "]")


def sparse_formats() -> list[str]:
    return [f for f in available_formats() if f.startswith(("csr", "bsr"))]


def run(shapes, batches, sparsities, budget: float, log: Callable[[str], None]) -> list[Record]:
    rng = np.random.default_rng(0)
    records: list[Record] = []
    for K, N in shapes:
        w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
        b = rng.standard_normal(N).astype(np.float32)
        xs = {B: rng.standard_normal((B, K)).astype(np.float32) for B in batches}
        dense: dict[str, tuple[Callable, int, str]] = {"numpy_fp32": ((lambda x: np.dot(x, w) + b), w.nbytes, "peer")}
        for name, (fn, nbytes) in onnx_sessions(w, b).items():
            dense[name] = (fn, nbytes, "peer")
        dense["tf_fp32"] = (tf_matmul(w, b), w.nbytes, "peer")
        for fmt, opts in DENSE_FORMATS:
            k = leanserve_kernel(fmt, opts, w, b)
            dense[label(fmt, opts)] = (k, k.nbytes, "leanserve")
        for B in batches:
            for name, (fn, nbytes, kind) in dense.items():
                t = median_seconds(lambda: fn(xs[B]), budget)
                records.append(Record(name, kind, (K, N), B, 0.0, t, nbytes))
            log(f"{K}x{N} batch {B} dense done")
        for s in sparsities:
            wu = prune_magnitude(w, s)
            entries: dict[str, tuple[Callable, int, str]] = {}
            fn, nbytes = scipy_csr(wu, b)
            entries["scipy_csr"] = (fn, nbytes, "peer")
            for fmt in sparse_formats():
                if fmt.startswith("bsr"):
                    block = BSR_BLOCKS.get(fmt, (1, 16))
                    k = leanserve_kernel(fmt, {"block": block}, prune_blocks(w, s, block), b)
                else:
                    k = leanserve_kernel(fmt, {}, wu, b)
                entries[fmt] = (k, k.nbytes, "leanserve")
            # what CPUs without AVX512_VNNI run: the portable bsr_int8 path, (8, 1) blocks
            k = leanserve_kernel("bsr_int8", {"block": PORTABLE_BSR_BLOCK}, prune_blocks(w, s, PORTABLE_BSR_BLOCK), b)
            k.use_vnni = False
            entries["bsr_int8[8x1,portable]"] = (k, k.nbytes, "leanserve")
            # int8 blocks along the outputs (inputs pruned one by one), the int8 twin of bsr_f32 (1, 16)
            k = leanserve_kernel("bsr_int8", {"block": (1, 16)}, prune_blocks(w, s, (1, 16)), b)
            entries["bsr_int8[1x16]"] = (k, k.nbytes, "leanserve")
            for B in batches:
                for name, (fn, nbytes, kind) in entries.items():
                    t = median_seconds(lambda: fn(xs[B]), budget)
                    records.append(Record(name, kind, (K, N), B, s, t, nbytes))
            log(f"{K}x{N} sparsity {s} done")
    return records


def add_ratios(records: list[Record], read_bw: float) -> None:
    """Fill speedups vs numpy fp32 and vs the best peer at the same (shape, batch[, sparsity])."""
    dense_peers = {(r.shape, r.batch): [] for r in records}
    for r in records:
        if r.kind == "peer" and r.sparsity == 0.0:
            dense_peers[(r.shape, r.batch)].append(r)
    for r in records:
        peers = list(dense_peers[(r.shape, r.batch)])
        peers += [p for p in records if p.kind == "peer" and p.sparsity == r.sparsity != 0.0
                  and p.shape == r.shape and p.batch == r.batch]
        numpy_t = next(p.median_s for p in peers if p.kernel == "numpy_fp32")
        best = min(peers, key=lambda p: p.median_s)
        r.ratio_numpy = numpy_t / r.median_s
        r.ratio_best_peer = best.median_s / r.median_s
        r.best_peer = best.kernel
        if r.batch == 1:
            r.bandwidth_fraction = r.weight_bytes / r.median_s / (read_bw * 1e9)


def print_tables(records: list[Record], info: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=160)
    console.print(f"[bold]threads: 1 everywhere[/]  bandwidth read {info['bandwidth']['read_GBps']:.1f} GB/s, "
                  f"copy {info['bandwidth']['copy_GBps']:.1f} GB/s  blas: {info['blas']}")
    table = Table(title="speedup = reference time / kernel time (>1 faster); bw = weight bytes/time/read bandwidth")
    for col in ("shape", "batch", "sparsity", "kernel", "median µs", "× numpy", "× best peer", "best peer", "bw (b=1)"):
        table.add_column(col, justify="right" if col not in ("kernel", "best peer") else "left")
    for r in records:
        style = "bold" if r.kind == "leanserve" else "dim"
        table.add_row(
            f"{r.shape[0]}x{r.shape[1]}", str(r.batch), f"{r.sparsity:g}", escape(r.kernel), f"{r.median_s * 1e6:.1f}",
            f"{r.ratio_numpy:.2f}", f"{r.ratio_best_peer:.2f}", r.best_peer,
            "" if r.bandwidth_fraction is None else f"{r.bandwidth_fraction:.2f}", style=style,
        )
    console.print(table)


def plot(records: list[Record]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r.shape for r in records}, key=lambda s: s[0] * s[1])
    paths = []
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in records if r.shape == shape and r.sparsity == 0.0]
        for name in dict.fromkeys(r.kernel for r in rows):
            pts = sorted((r.batch, r.ratio_numpy) for r in rows if r.kernel == name)
            kind = next(r.kind for r in rows if r.kernel == name)
            ax.plot(*zip(*pts), "o-" if kind == "leanserve" else "x--", label=name)
        ax.set(xscale="log", yscale="log", title=f"{shape[0]}x{shape[1]} dense", xlabel="batch")
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("speedup vs numpy fp32")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(RESULTS / "kernels_dense.png")
    fig.savefig(paths[-1], dpi=110)
    sparse = [r for r in records if r.sparsity > 0]
    if sparse:
        batches = sorted({r.batch for r in sparse})
        bsel = [batches[0], batches[-1]] if len(batches) > 1 else batches
        fig, axes = plt.subplots(len(bsel), len(shapes), figsize=(4 * len(shapes), 3.4 * len(bsel)), squeeze=False)
        for i, batch in enumerate(bsel):
            for ax, shape in zip(axes[i], shapes):
                rows = [r for r in sparse if r.shape == shape and r.batch == batch]
                for name in dict.fromkeys(r.kernel for r in rows):
                    pts = sorted((r.sparsity, r.ratio_numpy) for r in rows if r.kernel == name)
                    ax.plot(*zip(*pts), "o-" if name != "scipy_csr" else "x--", label=name)
                ax.set(yscale="log", title=f"{shape[0]}x{shape[1]} batch {batch}", xlabel="sparsity")
                ax.axhline(1.0, color="grey", lw=0.5)
            axes[i][0].set_ylabel("speedup vs numpy fp32 dense")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        paths.append(RESULTS / "kernels_sparse.png")
        fig.savefig(paths[-1], dpi=110)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="subset of shapes/batches/sparsities, short timings")
    parser.add_argument("--budget", type=float, default=None, help="seconds of samples per measurement")
    parser.add_argument("--model-only", action="store_true", help="only the whole seed MLP (printed, not written)")
    args = parser.parse_args(argv)
    shapes, batches, sparsities = (
        (QUICK_SHAPES, QUICK_BATCHES, QUICK_SPARSITIES) if args.quick else (SHAPES, BATCHES, SPARSITIES)
    )
    budget = args.budget or (0.1 if args.quick else 0.3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    threadpool_limits(1)
    if args.model_only:
        print_model(run_model(batches, lambda fn: median_seconds(fn, budget)))
        return
    info = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP", "MKL", "NUMBA"))},
        "blas": [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                 for d in threadpool_info()],
        "threads": "1 for every kernel (numpy via threadpoolctl, ORT intra/inter=1, TF intra/inter=1)",
        "bandwidth": measure_bandwidth(),
        "leanserve_formats": available_formats(),
        "bsr_blocks": BSR_BLOCKS,
    }
    t0 = time.perf_counter()
    records = run(shapes, batches, sparsities, budget, lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}",
                                                                        file=sys.stderr, flush=True))
    add_ratios(records, info["bandwidth"]["read_GBps"])
    model = run_model(batches, lambda fn: median_seconds(fn, budget))
    out = RESULTS / "kernels.json"
    out.write_text(json.dumps({"info": info, "records": [asdict(r) for r in records], "model": model}, indent=1))
    print(f"wrote {out}")
    print_tables(records, info)
    print_model(model)
    try:
        paths = plot(records)
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'leanserve[bench]')")
    else:
        for p in paths:
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
