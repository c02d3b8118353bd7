"""Dynamic batching, deadlines, queue limits, stream pipelining and metrics through a real server."""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from leanserve.client import Client
from leanserve.client import codec, common
from leanserve.v2 import grpc_service_pb2 as v2
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc
from leanserve.server.app import ServerHandle
from tests.toy import GatedRunner, wait_until




def _hold(c: Client, runner: GatedRunner) -> threading.Thread:
    """One request that is inside the kernel (gate closed) when this returns."""
    runner.gate.clear()
    t = threading.Thread(target=c.predict, args=("toy", np.ones((1, 4), np.float32)))
    t.start()
    assert runner.entered.wait(30)
    return t


def _v2_request(name: str, x: np.ndarray, rid: str = "", input_name: str = "input") -> v2.ModelInferRequest:
    return v2.ModelInferRequest(
        model_name=name, id=rid,
        inputs=[v2.ModelInferRequest.InferInputTensor(name=input_name, datatype="FP32", shape=x.shape)],
        raw_input_contents=[x.tobytes()],
    )


# every caller holds a gRPC thread while it waits: 33 calls in flight at once, 16 of them streams
@pytest.mark.settings(worker_threads=64, max_open_streams=32)
def test_concurrent_callers_of_every_api_share_one_kernel_call(gated_server) -> None:
    handle, runner = gated_server
    xs = [np.full((1 + i % 2, 4), i, np.float32) for i in range(32)]
    with Client(f"127.0.0.1:{handle.port}", timeout=60) as c:
        v2_stub = v2_grpc.GRPCInferenceServiceStub(c.channel)

        def call(i: int) -> np.ndarray:
            x = xs[i]
            if i % 4 == 0:
                return c.predict("toy", x).output
            if i % 4 == 1:
                resp = v2_stub.ModelInfer(_v2_request("toy", x, input_name="x"), timeout=60)
                return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(x.shape)
            if i % 4 == 2:
                return next(iter(c.stream("toy", [x]))).output
            resp = next(v2_stub.ModelStreamInfer(iter([_v2_request("toy", x, input_name="x")]), timeout=60))
            return np.frombuffer(resp.infer_response.raw_output_contents[0], np.float32).reshape(x.shape)

        held = _hold(c, runner)
        batcher = handle.dataplane.get_model("toy").batcher
        with ThreadPoolExecutor(32) as pool:
            answers = pool.map(call, range(32))
            wait_until(lambda: batcher.queued == 32, "all 32 callers are queued")
            runner.gate.set()
            for x, y in zip(xs, answers):
                np.testing.assert_array_equal(y, x * 2)
        held.join(30)
    assert runner.calls == [1, 48]  # 32 requests (48 rows) from four kinds of callers: one kernel call


def test_batched_answers_match_unbatched(server: ServerHandle, client: Client, model_files) -> None:
    client.upload(model_files["seed_h5"], "seed")
    model = server.dataplane.get_model("seed")
    xs = [np.random.default_rng(i).normal(size=(1 + i % 3, 1000)).astype(np.float32) for i in range(128)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda x: client.predict("seed", x).output, xs))
    for x, y in zip(xs, answers):
        np.testing.assert_allclose(y, model.infer(x), atol=1e-6, rtol=0)
    snap = model.stats.snapshot()
    assert snap.success_count == 128 and snap.inference_count == sum(len(x) for x in xs)
    assert sum(n for n, _ in snap.batches.values()) == snap.execution_count <= 128


@pytest.mark.settings(batch_max_queue_size=1)
def test_full_queue_is_resource_exhausted(gated_server) -> None:
    handle, runner = gated_server
    with Client(f"127.0.0.1:{handle.port}", timeout=60) as c:
        held = _hold(c, runner)
        queued = threading.Thread(target=c.predict, args=("toy", np.ones((1, 4), np.float32)))
        queued.start()
        batcher = handle.dataplane.get_model("toy").batcher
        wait_until(lambda: batcher.queued == 1, "the second request is queued")
        with pytest.raises(grpc.RpcError) as err:
            c.predict("toy", np.ones((1, 4), np.float32))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        runner.gate.set()
        held.join(30)
        queued.join(30)
        assert runner.calls == [1, 1]


def test_deadline_passed_in_queue_is_deadline_exceeded_without_compute(gated_server) -> None:
    handle, runner = gated_server
    model = handle.dataplane.get_model("toy")
    with Client(f"127.0.0.1:{handle.port}", timeout=60) as c:
        held = _hold(c, runner)
        with pytest.raises(grpc.RpcError) as err:
            c.predict("toy", np.ones((1, 4), np.float32), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: model.stats.snapshot().fail_count == 1, "the server gave up on the request")
        runner.gate.set()
        held.join(30)
        np.testing.assert_array_equal(c.predict("toy", np.full((1, 4), 3, np.float32)).output, 6)
    assert runner.calls == [1, 1]  # the expired request never reached the kernel


def test_cancelled_call_does_no_work(gated_server) -> None:
    handle, runner = gated_server
    with Client(f"127.0.0.1:{handle.port}", timeout=60) as c:
        held = _hold(c, runner)
        future = c.inference_stub.Predict.future(common.predict_request("toy", np.ones((1, 4), np.float32)))
        batcher = handle.dataplane.get_model("toy").batcher
        wait_until(lambda: batcher.queued == 1, "the request is queued")
        future.cancel()
        model = handle.dataplane.get_model("toy")
        wait_until(lambda: model.stats.snapshot().fail_count == 1, "the server saw the cancellation")
        runner.gate.set()
        held.join(30)
        c.predict("toy", np.ones((1, 4), np.float32))
    assert runner.calls == [1, 1]


def test_stream_reads_ahead_batches_and_answers_in_order(gated_server) -> None:
    handle, runner = gated_server
    xs = [np.full((1 + i % 2, 4), i, np.float32) for i in range(6)]
    requests = [common.predict_request("toy", x, request_id=str(i)) for i, x in enumerate(xs)]
    requests.insert(3, common.predict_request("toy", np.ones((1, 2, 2), np.float32), request_id="bad"))
    with Client(f"127.0.0.1:{handle.port}", timeout=60) as c:
        held = _hold(c, runner)
        answers = c.inference_stub.PredictStream(iter(requests), timeout=60)
        batcher = handle.dataplane.get_model("toy").batcher
        # the stream does not wait for each answer before reading on: all six good requests are queued at once
        wait_until(lambda: batcher.queued == 6, "the stream's requests are queued together")
        runner.gate.set()
        held.join(30)
        got = list(answers)
    assert [r.request_id for r in got] == ["0", "1", "2", "bad", "3", "4", "5"]
    assert got[3].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for x, r in zip(xs, got[:3] + got[4:]):
        np.testing.assert_array_equal(codec.to_numpy(r.outputs[0]), x * 2)
    assert runner.calls == [1, sum(len(x) for x in xs)]  # one stream's requests batched into one kernel call


@pytest.mark.settings(batching=False)
def test_batching_off_runs_every_request_alone(gated_server) -> None:
    handle, runner = gated_server
    model = handle.dataplane.get_model("toy")
    with Client(f"127.0.0.1:{handle.port}", timeout=60) as c, ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: c.predict("toy", np.full((1, 4), i, np.float32)).output, range(32)))
    assert [o[0, 0] for o in outs] == [2 * i for i in range(32)]
    assert runner.calls == [1] * 32 and model.stats.snapshot().dispatch == {"inline": 32}


def test_prometheus_metrics_over_http(gated_server) -> None:
    handle, _ = gated_server
    with Client(f"127.0.0.1:{handle.port}", timeout=60) as c:
        for n in (1, 3):
            c.predict("toy", np.ones((n, 4), np.float32))
        with pytest.raises(grpc.RpcError):
            c.predict("toy", np.ones((1, 4), np.float64))
    text = urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics", timeout=30).read().decode()
    samples = {
        (s.name, s.labels.get("le", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("model") == "toy" and s.labels.get("version") == "1"
    }
    assert samples[("nv_inference_request_success_total", "")] == 2
    assert samples[("nv_inference_request_failure_total", "")] == 1
    assert samples[("nv_inference_count_total", "")] == 4  # rows
    assert samples[("nv_inference_exec_count_total", "")] == 2  # kernel calls
    assert samples[("leanserve_batch_size_bucket", "2.0")] == 1 and samples[("leanserve_batch_size_bucket", "4.0")] == 2
    assert samples[("leanserve_batch_size_sum", "")] == 4
    assert ("nv_inference_queue_duration_us_total", "") in samples
    assert ("nv_inference_compute_infer_duration_us_total", "") in samples
