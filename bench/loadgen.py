"""The load generator's client side: several worker PROCESSES, each running threads that issue batch-1 requests.

Closed loop: each thread keeps one request in flight (send, wait, send again). Open loop: request i of a process is
due at ``start + i / rate``; a free thread sends it when due and its latency counts from the due time, so a server
that falls behind shows the queueing delay instead of hiding it (no coordinated omission).

A worker imports only its protocol's client library: native workers import ``leanserve.v1``, v2 workers import
``tritonclient.grpc`` (whose descriptors clash with our ``inference`` package in one process, kserve#3099).
Every loop ends at a deadline; every request carries a timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

REQUEST_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Load:
    """What one point asks of the clients (the whole point; it is split across processes)."""

    target: str
    protocol: str  # "native" | "v2"
    mode: str  # "unary" | "stream"
    model: str
    input_name: str
    in_features: int
    concurrency: int  # closed: in-flight requests; open: threads
    rate: float = 0.0  # open loop when > 0 (requests/s over all processes)
    duration: float = 5.0
    warmup: float = 1.0
    procs: int = 2
    batch: int = 1
    #: each client thread on its own TCP connection (independent clients), rather than gRPC's default of one
    #: connection per process shared by all of its channels with the same target and options
    own_connection: bool = True


@dataclass
class Collected:
    latencies: np.ndarray  # seconds, requests started inside the window
    errors: int
    cpu_s: float
    first_error: str
    procs: int
    server_cpu_s: float = float("nan")  # the server's CPU seconds over the window (NaN: not measured)


# -- callers: one per thread, ``call()`` blocks until the answer ------------------------------------------------
def _channel_options(load: Load) -> list[tuple[str, int]]:
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if load.own_connection:
        opts.append(("grpc.use_local_subchannel_pool", 1))
    return opts


def _native_caller(load: Load, x: np.ndarray) -> tuple[Callable[[], None], Callable[[], None]]:
    import grpc

    from leanserve.v1 import inference_service_pb2 as pb
    from leanserve.v1 import inference_service_pb2_grpc as pb_grpc
    from leanserve.v1 import tensor_pb2

    channel = grpc.insecure_channel(load.target, options=_channel_options(load))
    stub = pb_grpc.InferenceServiceStub(channel)
    tensor = tensor_pb2.Tensor(name=load.input_name, dtype=tensor_pb2.FLOAT32, shape=x.shape, data=x.tobytes())
    req = pb.PredictRequest(model_name=load.model, inputs=[tensor])
    if load.mode == "unary":
        def call() -> None:
            stub.Predict(req, timeout=REQUEST_TIMEOUT_S)
        return call, channel.close

    outbox: queue.Queue = queue.Queue()
    inbox: queue.Queue = queue.Queue()
    responses = stub.PredictStream(iter(outbox.get, None), timeout=3600)

    def read() -> None:  # a reader thread, so a stalled stream times out instead of blocking forever
        try:
            for resp in responses:
                inbox.put(resp)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
            inbox.put(exc)

    threading.Thread(target=read, daemon=True).start()

    def call() -> None:
        outbox.put(req)
        resp = inbox.get(timeout=REQUEST_TIMEOUT_S)
        if isinstance(resp, Exception):
            raise resp
        if resp.HasField("error"):
            raise RuntimeError(f"stream error {resp.error.code}: {resp.error.message}")

    def close() -> None:
        outbox.put(None)
        responses.cancel()
        channel.close()
    return call, close


def _v2_caller(load: Load, x: np.ndarray) -> tuple[Callable[[], None], Callable[[], None]]:
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(load.target, channel_args=_channel_options(load))
    inp = tc.InferInput(load.input_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    if load.mode == "unary":
        def call() -> None:
            client.infer(load.model, [inp], client_timeout=REQUEST_TIMEOUT_S)
        return call, client.close

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error))

    def call() -> None:
        client.async_stream_infer(load.model, [inp])
        error = answers.get(timeout=REQUEST_TIMEOUT_S)
        if error is not None:
            raise RuntimeError(str(error))

    def close() -> None:
        client.stop_stream(cancel_requests=True)
        client.close()
    return call, close


CALLERS = {"native": _native_caller, "v2": _v2_caller}


# -- one worker process ------------------------------------------------------------------------------------------
def _worker(load: Load, threads: int, rate: float, seed: int, ready: Any, go: Any, start_at: Any, out: Any) -> None:
    try:
        x = np.random.default_rng(seed).random((load.batch, load.in_features), dtype=np.float32)
        # one unary request before the clock starts: fail fast on a wrong target or model (unary, because a
        # server may leave some streams unserved, which the point must measure, not die of)
        check, close_check = CALLERS[load.protocol](replace(load, mode="unary"), x)
        check()
        close_check()
        callers = [CALLERS[load.protocol](load, x) for _ in range(threads)]
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the point loudly
        ready.put(("error", traceback.format_exc()))
        return
    ready.put(("ok", ""))
    if not go.wait(120):
        return
    t0 = start_at.value
    t_end = t0 + load.duration
    lock = threading.Lock()
    lat: list[float] = []
    errors = [0]
    first_error = [""]
    next_slot = [0]

    def record(started: float, finished: float, err: BaseException | None) -> None:
        if started < t0 or started >= t_end:
            return
        with lock:
            if err is None:
                lat.append(finished - started)
            else:
                errors[0] += 1
                first_error[0] = first_error[0] or repr(err)[:300]

    def closed_loop(call: Callable[[], None]) -> None:
        while (now := time.time()) < t_end:
            err = None
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - counted as an error of the point
                err = exc
            record(now, time.time(), err)
            if err is not None:
                time.sleep(0.05)  # a failing server must not turn the loop into a busy spin

    # open loop: the clock of this process starts at the warm-up start, so warm-up traffic has the same rate
    open_start = t0 - load.warmup

    def open_loop(call: Callable[[], None]) -> None:
        while True:
            with lock:
                i = next_slot[0]
                next_slot[0] += 1
            due = open_start + i / rate
            if due >= t_end:
                return
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            err = None
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                err = exc
            record(due, time.time(), err)

    body = open_loop if rate > 0 else closed_loop
    cpu0 = time.process_time()
    workers = [threading.Thread(target=body, args=(call,), daemon=True) for call, _ in callers]
    for t in workers:
        t.start()
    # one shared deadline: a call stalled past the window is cancelled by close() below and counted as an error
    deadline = t_end + 5.0
    for t in workers:
        t.join(max(0.0, deadline - time.time()))
    cpu = time.process_time() - cpu0
    # counted before close(): closing cancels the stalled calls, which then look like ordinary failures
    stalled = sum(t.is_alive() for t in workers)
    for _, close in callers:
        try:
            close()
        except Exception:  # noqa: BLE001 - closing a broken stream must not lose the measurements
            pass
    for t in workers:
        t.join(max(0.0, deadline + 2.0 - time.time()))
    with lock:
        if stalled:
            errors[0] += stalled
            first_error[0] = first_error[0] or f"{stalled} of {len(workers)} client(s) stalled: no answer {deadline - t_end:.0f} s after the window"
        latencies = np.asarray(lat, dtype=np.float64)
    # the CPU time covers warm-up + window; scale it to the window so it is comparable with the wall time
    out.put((latencies, errors[0], cpu * load.duration / (load.duration + load.warmup),
             first_error[0]))


def _server_cpu(pgid: int, start_at: float, duration: float, out: list[float]) -> None:
    """The CPU seconds process group ``pgid`` uses from ``start_at`` (a time.time()) for ``duration`` seconds."""
    import common

    time.sleep(max(0.0, start_at - time.time()))
    before = common.process_group_cpu_s(pgid)
    time.sleep(max(0.0, start_at + duration - time.time()))
    out.append(common.process_group_cpu_s(pgid) - before)


def run(load: Load, server_pgid: int | None = None) -> Collected:
    """Spawn the worker processes, start them together, collect their latencies; with ``server_pgid`` (the
    server's process group), also the server's CPU over the measured window."""
    ctx = mp.get_context("spawn")  # fork after TF/grpc is unsafe; spawn gives each worker a clean interpreter
    procs = max(1, min(load.procs, load.concurrency))
    split = [load.concurrency // procs + (1 if i < load.concurrency % procs else 0) for i in range(procs)]
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    children = [
        ctx.Process(target=_worker, args=(load, n, load.rate / procs, i, ready, go, start_at, out), daemon=True)
        for i, n in enumerate(split)
    ]
    for c in children:
        c.start()
    try:
        for _ in children:
            status, msg = ready.get(timeout=120)
            if status != "ok":
                raise RuntimeError(f"client worker failed to start:\n{msg}")
        start_at.value = time.time() + load.warmup
        server_cpu: list[float] = []
        sampler = None
        if server_pgid:
            sampler = threading.Thread(target=_server_cpu, args=(server_pgid, start_at.value, load.duration,
                                                                  server_cpu), daemon=True)
            sampler.start()
        go.set()
        results = [out.get(timeout=load.warmup + load.duration + 60) for _ in children]
        if sampler is not None:
            sampler.join(load.warmup + load.duration + 5)
    finally:
        go.set()
        for c in children:
            c.join(10)
            if c.is_alive():
                c.kill()
    lat = np.concatenate([r[0] for r in results]) if results else np.zeros(0)
    return Collected(
        latencies=lat, errors=sum(r[1] for r in results), cpu_s=sum(r[2] for r in results),
        first_error=next((r[3] for r in results if r[3]), ""), procs=procs,
        server_cpu_s=server_cpu[0] if server_cpu else float("nan"),
    )


# -- probes (each in its own process, for the same descriptor reason) -----------------------------------------
def _v2_probe(target: str, model: str, input_name: str, x: np.ndarray, timeout: float, out: Any) -> None:
    try:
        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(target)
        deadline = time.time() + timeout
        while True:
            try:
                if client.is_server_live() and client.is_model_ready(model):
                    break
            except Exception as exc:  # noqa: BLE001
                if "UNIMPLEMENTED" in str(exc) or time.time() > deadline:
                    raise
            if time.time() > deadline:
                raise TimeoutError(f"model {model!r} not ready after {timeout:.0f} s")
            time.sleep(0.25)
        inp = tc.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(model, [inp], client_timeout=REQUEST_TIMEOUT_S)
        name = result.get_response().outputs[0].name
        out.put(("ok", result.as_numpy(name)))
    except Exception as exc:  # noqa: BLE001
        out.put(("error", f"{type(exc).__name__}: {str(exc)[:500]}"))


def v2_probe(target: str, model: str, input_name: str, x: np.ndarray, timeout: float = 60.0) -> tuple[bool, Any]:
    """Wait until a V2 server has ``model`` ready and run one request: (True, output array) or (False, message)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_v2_probe, args=(target, model, input_name, x, timeout, out), daemon=True)
    p.start()
    try:
        status, value = out.get(timeout=timeout + 60)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    return status == "ok", value


def _v2_stream_rows(target: str, model: str, input_name: str, batches: int, batch: int, in_features: int,
                    window: int, out: Any) -> None:
    try:
        import tritonclient.grpc as tc

        pool = [np.random.default_rng(i).random((batch, in_features), dtype=np.float32) for i in range(4)]
        inputs = []
        for x in pool:
            inp = tc.InferInput(input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            inputs.append([inp])
        client = tc.InferenceServerClient(target, channel_args=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        free = threading.Semaphore(window)  # requests in flight, as our client's stream window
        done, rows, errors = threading.Event(), [0], []
        expected = [0]

        def answer(result: Any, error: Any) -> None:
            if error is not None:
                errors.append(str(error)[:300])
            else:
                rows[0] += result.get_response().outputs[0].shape[0]
            free.release()
            expected[0] -= 1
            if expected[0] == 0:
                done.set()

        client.start_stream(callback=answer)
        for warm in range(4):  # the same warm-up as the native stream
            expected[0] += 1
            free.acquire()
            client.async_stream_infer(model, inputs[warm])
        done.wait(REQUEST_TIMEOUT_S)
        done.clear()
        rows[0] = 0
        expected[0] = batches
        t = time.perf_counter()
        for i in range(batches):
            if not free.acquire(timeout=REQUEST_TIMEOUT_S):
                raise TimeoutError("no stream answer in time")
            client.async_stream_infer(model, inputs[i % len(inputs)])
        if not done.wait(REQUEST_TIMEOUT_S):
            raise TimeoutError("the stream did not answer every request")
        seconds = time.perf_counter() - t
        client.stop_stream()
        client.close()
        out.put(("ok", (rows[0], seconds, errors[:3])))
    except Exception as exc:  # noqa: BLE001
        out.put(("error", f"{type(exc).__name__}: {str(exc)[:500]}"))


def v2_stream_rows(target: str, model: str, input_name: str, batches: int, batch: int, in_features: int,
                   window: int = 8, timeout: float = 600.0) -> tuple[int, float, list[str]]:
    """tritonclient's ModelStreamInfer with ``window`` requests in flight: (rows answered, seconds, errors)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_v2_stream_rows,
                    args=(target, model, input_name, batches, batch, in_features, window, out), daemon=True)
    p.start()
    try:
        status, value = out.get(timeout=timeout)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    if status != "ok":
        raise RuntimeError(f"tritonclient stream failed: {value}")
    return value
