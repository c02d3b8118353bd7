"""bench/kernels.py's last section: the seed MLP whole, leanserve's fused fp32 chain beside the same layers called one
by one, numpy and onnxruntime running the whole graph (1 thread everywhere, as the rest of kernels.py).

At batch 1 each system is also timed with cold caches: right after a read of a buffer three times the last-level
cache, as a server's kernel runs when other work (clients, other tenants of the host) ran since the last request.
Beside them the memory floor: copying the model's weight bytes once, cold. The seed's first layer alone is 512 KB, so
at one client a request's latency holds this read whatever the kernel does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def ort_mlp(layers: list[tuple[np.ndarray, np.ndarray]]) -> Callable[[np.ndarray], object]:
    """The whole MLP (Gemm + Relu ..., Softmax last) as one ORT fp32 session, 1 thread, all graph optimizations."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, h = [], [], "x"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [h, f"W{i}", f"b{i}"], [f"g{i}"]))
        h = f"a{i}" if i < len(layers) - 1 else "y"
        nodes.append(helper.make_node("Relu" if i < len(layers) - 1 else "Softmax", [f"g{i}"], [h]))
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", layers[0][0].shape[0]])
    y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", layers[-1][0].shape[1]])
    graph = helper.make_graph(nodes, "mlp", [x_in], [y_out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def run_model(batches: list[int], timer: Callable[[Callable[[], object]], float]) -> list[dict[str, object]]:
    """The seed MLP (1000→128→64→10, relu, relu, softmax) end to end: leanserve's Plan with the fp32 layers fused
    into one call, the same layers called one by one, numpy, and ORT running the whole graph."""
    from leanserve.kernels import fuse_dense_chains, get_format

    rng = np.random.default_rng(0)
    dims, acts = (1000, 128, 64, 10), ("relu", "relu", "softmax")
    weights = [((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32),
                rng.standard_normal(n).astype(np.float32)) for k, n in zip(dims, dims[1:])]
    layers = [get_format("dense_f32").from_dense(w, b, a) for (w, b), a in zip(weights, acts)]
    one_by_one = list(layers)
    fused = fuse_dense_chains(layers)

    def chain(steps):
        def run(x):
            for step in steps:
                x = step(x)
            return x
        return run

    def numpy_mlp(x):
        for i, (w, b) in enumerate(weights):
            x = x @ w + b
            x = np.maximum(x, 0) if i < len(weights) - 1 else x
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    systems = {"leanserve fused": chain(fused), "leanserve layer by layer": chain(one_by_one), "numpy": numpy_mlp,
               "ort_fp32 graph": ort_mlp(weights)}
    out = []
    for batch in batches:
        x = rng.standard_normal((batch, dims[0])).astype(np.float32)
        ref = numpy_mlp(x)
        times = {}
        for name, fn in systems.items():
            np.testing.assert_allclose(fn(x), ref, rtol=1e-3, atol=1e-5)
            times[name] = timer(lambda fn=fn: fn(x))
        out += [{"model": "seed MLP 1000-128-64-10", "batch": batch, "system": name, "median_s": t,
                 "ratio_fused": t / times["leanserve fused"]} for name, t in times.items()]
    out += cold_rows(systems, weights, rng.standard_normal((1, dims[0])).astype(np.float32))
    return out


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache's size (Linux sysfs), or ``default``."""
    from pathlib import Path

    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=default)


def cold_median_seconds(fn: Callable[[], object], evict: np.ndarray, repeats: int = 60) -> float:
    """Median seconds of ``fn()`` right after reading every cache line of ``evict`` (bigger than the caches)."""
    times = []
    for _ in range(repeats):
        float(evict[::16].sum())  # one float32 per 64-byte line: the whole buffer passes through the caches
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def cold_rows(systems: dict[str, Callable[[np.ndarray], object]], weights: list[tuple[np.ndarray, np.ndarray]],
              x: np.ndarray) -> list[dict[str, object]]:
    """Batch 1 with cold caches for each system, and the memory floor (the weight bytes copied once, cold)."""
    evict = np.ones(3 * last_level_cache_bytes() // 4, dtype=np.float32)
    blob = np.concatenate([a.ravel() for pair in weights for a in pair])
    dst = np.empty_like(blob)
    times = {f"{name} (cold cache)": cold_median_seconds(lambda fn=fn: fn(x), evict) for name, fn in systems.items()}
    times[f"memory floor: copy the {blob.nbytes // 1024} KB of weights (cold)"] = cold_median_seconds(
        lambda: np.copyto(dst, blob), evict)
    fused = times["leanserve fused (cold cache)"]
    return [{"model": "seed MLP 1000-128-64-10", "batch": 1, "system": name, "median_s": t, "ratio_fused": t / fused}
            for name, t in times.items()]


def print_model(model: list[dict[str, object]]) -> None:
    for m in model:
        print(f"{m['model']} batch {m['batch']:>3}: {m['system']:<48} {m['median_s'] * 1e6:8.1f} µs "
              f"(× {m['ratio_fused']:.2f} the fused plan's time)")
