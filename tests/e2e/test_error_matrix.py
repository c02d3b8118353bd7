"""Every status code the inference path can answer with, through every protocol that reaches it.

Codes: NOT_FOUND (unknown model), INVALID_ARGUMENT (wrong shape), FAILED_PRECONDITION (a model that refuses),
RESOURCE_EXHAUSTED (a gated model with a full queue), DEADLINE_EXCEEDED (a short deadline while the gated model is
busy), CANCELLED (the caller cancels while its request waits) and INTERNAL (a model that raises an unexpected
error). Protocols: leanserve.v1 Predict and PredictStream, the Open Inference Protocol's ModelInfer and
ModelStreamInfer through our stubs, and the same two through tritonclient (in a subprocess: its protos clash with
ours in one process).

Inside a stream a failed request is answered with its own error (v1 ``error.code``, V2 ``error_message``
"CODE: message") and the stream goes on: a request to a healthy model sent after it on the same stream is
answered. A deadline or a cancellation belongs to the whole stream (gRPC carries one per call), so there the
stream itself ends with that status. What is observable on the server is asserted too: a request whose deadline
passed, or whose unary call was cancelled, is counted as failed while the model is still busy and never reaches
the kernel; a cancelled stream's request is accounted once the model is free; every stream's slot is free again.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client, codec, common
from leanserve.server.app import ServerHandle, create_server
from leanserve.server.errors import FailedPrecondition
from leanserve.v2 import grpc_service_pb2 as v2
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc
from tests.conftest import make_settings
from tests.toy import GatedRunner, toy_model, wait_until

SCRIPT = Path(__file__).with_name("tritonclient_script.py")
ROOT = Path(__file__).parents[2]
CODES = ["NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED",
         "CANCELLED", "INTERNAL"]
PROTOCOLS = ["v1-unary", "v1-stream", "v2-unary", "v2-stream", "tritonclient-unary", "tritonclient-stream"]
#: codes a stream answers for the whole call (its deadline, its cancellation), not per request
CALL_LEVEL = {"DEADLINE_EXCEEDED", "CANCELLED"}
STREAM_SLOTS = 4
DEADLINE_SECONDS = 1.0
NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _raises(exc: Exception) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        raise exc

    return run


@dataclass
class Toys:
    """A server with four toy models (input "x", 4 features): ``ok`` (y = 2x), ``gated`` (y = 2x behind a gate,
    queue of one), ``broken`` (raises an unexpected error) and ``refusing`` (raises FailedPrecondition)."""

    handle: ServerHandle
    gated: GatedRunner
    client: Client
    threads: list[threading.Thread] = field(default_factory=list)

    def background_predict(self, model: str) -> None:
        t = threading.Thread(target=self.client.predict, args=(model, np.ones((1, 4), np.float32)), daemon=True)
        t.start()
        self.threads.append(t)

    def hold(self) -> None:
        """One request to ``gated`` is inside the kernel (the gate closed) when this returns."""
        self.gated.gate.clear()
        self.background_predict("gated")
        assert self.gated.entered.wait(60)

    @property
    def gated_model(self):  # noqa: ANN201 - a ServedModel
        return self.handle.dataplane.get_model("gated")

    def queued(self) -> int:
        return self.gated_model.batcher.queued

    def release(self) -> None:
        self.gated.gate.set()
        for t in self.threads:
            t.join(60)


@pytest.fixture
def toys(repo_dir: Path) -> Iterator[Toys]:
    handle = create_server(make_settings(repo_dir, batch_max_queue_size=1, worker_threads=16,
                                         max_open_streams=STREAM_SLOTS))
    gated = GatedRunner()
    dp = handle.dataplane
    dp.serve(toy_model(lambda x: x * 2, name="ok", features=4))
    dp.serve(toy_model(gated, name="gated", features=4))
    dp.serve(toy_model(_raises(RuntimeError("boom: a secret detail")), name="broken", features=4))
    dp.serve(toy_model(_raises(FailedPrecondition("the model refuses: not calibrated")), name="refusing",
                       features=4))
    with Client(f"127.0.0.1:{handle.port}", timeout=120) as client:
        toys = Toys(handle, gated, client)
        yield toys
        toys.release()
    handle.stop(0.5)


@dataclass(frozen=True)
class Case:
    model: str
    cols: int = 4
    deadline: float | None = None
    cancel: bool = False


def prepare(code: str, toys: Toys) -> Case:
    """Bring the server into the state where a request gets ``code``; return that request."""
    if code == "NOT_FOUND":
        return Case("nope")
    if code == "INVALID_ARGUMENT":
        return Case("ok", cols=5)
    if code == "FAILED_PRECONDITION":
        return Case("refusing")
    if code == "INTERNAL":
        return Case("broken")
    toys.hold()
    if code == "RESOURCE_EXHAUSTED":
        toys.background_predict("gated")  # the queue of one is full
        wait_until(lambda: toys.queued() == 1, "a second request waits in the queue")
        return Case("gated")
    if code == "DEADLINE_EXCEEDED":
        return Case("gated", deadline=DEADLINE_SECONDS)
    return Case("gated", cancel=True)


@dataclass
class Outcome:
    code: str
    message: str
    #: in a stream: the next request (to the healthy model) was answered; None when the call itself ended
    went_on: bool | None = None


def _x(cols: int) -> np.ndarray:
    return np.ones((1, cols), np.float32)


def _v2_request(model: str, cols: int, rid: str) -> v2.ModelInferRequest:
    return v2.ModelInferRequest(
        model_name=model, id=rid, raw_input_contents=[_x(cols).tobytes()],
        inputs=[v2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, cols])])


class _Feed:
    """A request iterator fed one message at a time (so a test reads each answer before sending the next)."""

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()

    def __iter__(self):  # noqa: ANN204
        while (item := self._q.get()) is not None:
            yield item

    def put(self, item: object) -> None:
        self._q.put(item)


def _cancel_when_queued(toys: Toys, cancel: Callable[[], object]) -> None:
    wait_until(lambda: toys.queued() == 1, "the request waits in the gated model's queue")
    cancel()


def _unary(toys: Toys, case: Case, send: Callable[..., object]) -> Outcome:
    if case.cancel:
        future = send.future(timeout=120)  # type: ignore[attr-defined]
        _cancel_when_queued(toys, future.cancel)
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
        return Outcome(grpc.StatusCode.CANCELLED.name if future.cancelled() else "?", "")
    with pytest.raises(grpc.RpcError) as err:
        send(timeout=case.deadline or 120)
    return Outcome(err.value.code().name, err.value.details() or "")


def v1_unary(toys: Toys, case: Case) -> Outcome:
    request = common.predict_request(case.model, _x(case.cols), request_id="bad")
    stub = toys.client.inference_stub.Predict

    class Send:
        def __call__(self, timeout: float) -> object:
            return stub(request, timeout=timeout)

        def future(self, timeout: float) -> grpc.Future:
            return stub.future(request, timeout=timeout)

    return _unary(toys, case, Send())


def v2_unary(toys: Toys, case: Case) -> Outcome:
    request = _v2_request(case.model, case.cols, "bad")
    stub = v2_grpc.GRPCInferenceServiceStub(toys.client.channel).ModelInfer

    class Send:
        def __call__(self, timeout: float) -> object:
            return stub(request, timeout=timeout)

        def future(self, timeout: float) -> grpc.Future:
            return stub.future(request, timeout=timeout)

    return _unary(toys, case, Send())


def _stream(toys: Toys, case: Case, open_call: Callable[[_Feed, float | None], Iterator], bad: object,
            good: object, read: Callable[[object], tuple[str, str, str, np.ndarray | None]]) -> Outcome:
    """``read(answer)`` -> (request id, error code name or "", message, output)."""
    feed = _Feed()
    call = open_call(feed, case.deadline)
    feed.put(bad)
    try:
        if case.cancel:
            _cancel_when_queued(toys, call.cancel)  # type: ignore[attr-defined]
        try:
            first = next(call)
        except grpc.RpcError as err:  # the call itself ended
            return Outcome(err.code().name, err.details() or "")
        rid, code, message, _ = read(first)
        assert rid == "bad" and code, (rid, code)
        if case.deadline is not None:
            # the server gave up on the request as the call's deadline passed, and its answer got out first:
            # the call ends with the same status right after
            with pytest.raises(grpc.RpcError) as err:
                next(call)
            assert err.value.code().name == code
            return Outcome(code, message)
        feed.put(good)
        rid2, code2, _, y = read(next(call))
        went_on = rid2 == "good" and not code2 and np.array_equal(y, _x(4) * 2)
        return Outcome(code, message, went_on)
    finally:
        feed.put(None)


def v1_stream(toys: Toys, case: Case) -> Outcome:
    def read(answer: object) -> tuple[str, str, str, np.ndarray | None]:
        if answer.HasField("error"):  # type: ignore[attr-defined]
            return answer.request_id, NAMES[answer.error.code], answer.error.message, None  # type: ignore[attr-defined]
        return answer.request_id, "", "", codec.to_numpy(answer.outputs[0])  # type: ignore[attr-defined]

    return _stream(toys, case, lambda feed, deadline: toys.client.inference_stub.PredictStream(
        iter(feed), timeout=deadline or 120), common.predict_request(case.model, _x(case.cols), request_id="bad"),
        common.predict_request("ok", _x(4), request_id="good"), read)


def v2_stream(toys: Toys, case: Case) -> Outcome:
    stub = v2_grpc.GRPCInferenceServiceStub(toys.client.channel)

    def read(answer: object) -> tuple[str, str, str, np.ndarray | None]:
        resp = answer.infer_response  # type: ignore[attr-defined]
        if answer.error_message:  # type: ignore[attr-defined]
            code, _, message = answer.error_message.partition(": ")  # type: ignore[attr-defined]
            return resp.id, code, message, None
        return resp.id, "", "", np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(1, 4)

    return _stream(toys, case, lambda feed, deadline: stub.ModelStreamInfer(iter(feed), timeout=deadline or 120),
                   _v2_request(case.model, case.cols, "bad"), _v2_request("ok", 4, "good"), read)


def tritonclient(mode: str) -> Callable[[Toys, Case], Outcome]:
    def run(toys: Toys, case: Case) -> Outcome:
        args = [sys.executable, str(SCRIPT), "matrix", f"127.0.0.1:{toys.handle.port}", case.model, mode,
                str(case.cols), str(case.deadline or 0), "1" if case.cancel else "0"]
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT)
        try:
            if case.cancel:
                assert proc.stdout is not None and proc.stdout.readline() == "sent\n"
                wait_until(lambda: toys.queued() == 1, "the request waits in the gated model's queue")
            out, err = proc.communicate("cancel\n" if case.cancel else "", timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err
        seen = json.loads(out.strip().splitlines()[-1])
        error = seen["first"]["error"]
        assert error is not None, seen
        code, message = error["status"], error["message"]
        if code is None:  # an error answered inside the stream: "CODE: message"
            code, _, message = message.partition(": ")
        went_on = None
        if "next" in seen:
            went_on = seen["next"]["error"] is None and seen["next"]["id"] == "good" and seen["next"]["y"] == [
                [2.0] * 4]
        return Outcome(code, message, went_on)

    return run


SEND = {"v1-unary": v1_unary, "v1-stream": v1_stream, "v2-unary": v2_unary, "v2-stream": v2_stream,
        "tritonclient-unary": tritonclient("unary"), "tritonclient-stream": tritonclient("stream")}


def _every_stream_slot_is_free(client: Client) -> bool:
    """Open as many streams as there are slots at once; each must get an answer (none refused)."""
    feeds, calls = [], []
    try:
        for i in range(STREAM_SLOTS):
            feed = _Feed()
            call = client.inference_stub.PredictStream(iter(feed), timeout=120)
            feeds.append(feed)
            calls.append(call)
            feed.put(common.predict_request("ok", _x(4), request_id=str(i)))
            try:
                if next(call).request_id != str(i):
                    return False
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                return False
        return True
    finally:
        for feed in feeds:
            feed.put(None)
        for call in calls:
            try:
                list(call)
            except grpc.RpcError:
                pass


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("code", CODES)
def test_status_code_through_every_protocol(toys: Toys, code: str, protocol: str) -> None:
    case = prepare(code, toys)
    outcome = SEND[protocol](toys, case)
    stream = protocol.endswith("stream")

    assert outcome.code == code, (outcome.code, outcome.message)
    if code == "NOT_FOUND":
        assert "nope" in outcome.message
    elif code == "INVALID_ARGUMENT":
        assert "5" in outcome.message and "shape" in outcome.message
    elif code == "FAILED_PRECONDITION":
        assert "not calibrated" in outcome.message
    elif code == "RESOURCE_EXHAUSTED":
        assert "queue is full" in outcome.message
    elif code == "INTERNAL":
        assert "secret" not in outcome.message and "boom" not in outcome.message  # details stay in the log
    if stream and code not in CALL_LEVEL:
        assert outcome.went_on is True, "the stream did not go on after the failed request"

    stats = toys.gated_model.stats
    if code == "CANCELLED" and stream:
        # the stream's request waits in the queue until the worker meets it; it is dropped there if the server
        # has seen the cancellation by then (else computed, its answer going nowhere): either way it is accounted
        toys.release()
        wait_until(lambda: stats.snapshot().success_count + stats.snapshot().fail_count == 2,
                   "the server finished with the cancelled stream's request")
    elif code in CALL_LEVEL:  # the server gives up on the request while the gate is still closed
        wait_until(lambda: stats.snapshot().fail_count == 1, "the server gave up on the request")
        toys.release()
        assert toys.gated.calls == [1]  # only the request that held the gate: the other was never computed
    elif code == "RESOURCE_EXHAUSTED":
        toys.release()
        assert toys.gated.calls == [1, 1]  # the refused request never queued
    if stream:
        toys.release()
        wait_until(lambda: _every_stream_slot_is_free(toys.client), "every stream slot is free again")
