"""No starvation: long calls (uploads, optimizations, both predict streams) draw from bounded slots of their own and
end after an idle timeout, so idle callers never take the threads unary calls need.

Streams are opened with grpc.aio (hundreds of calls on one event loop); nothing here asserts a duration."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import pytest

from leanserve.client import Client, common
from leanserve.v1 import inference_service_pb2_grpc as inf_grpc
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import model_service_pb2_grpc as model_grpc
from leanserve.v1 import optimize_service_pb2 as opt_pb
from leanserve.v1 import optimize_service_pb2_grpc as opt_grpc
from leanserve.v2 import grpc_service_pb2 as v2
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc
from leanserve.server.app import ServerHandle
from tests.toy import wait_until

# the defaults' proportions (128 threads: 96 predict streams, 8 uploads, 2 optimizations) at a quarter of the size;
# both protocols' predict streams share one pool
POOLS = {("predict_stream", "model_stream_infer"): 20, ("upload",): 4, ("optimize",): 2}
LIMITS = dict(worker_threads=32, max_open_streams=20, max_open_uploads=4, max_open_optimizations=2)
IDLE_SECONDS = 15.0  # long enough to hold every slot while the test checks, short enough to wait for
PER_KIND = 200

UPLOAD_HEADER = model_pb.UploadModelRequest(
    header=model_pb.UploadHeader(name="idle", format=model_pb.LEANSERVE, size_bytes=1000, sha256="0" * 64))
OPTIONS = opt_pb.OptimizeRequest(options=opt_pb.OptimizeOptions(model_name="toy", target_sparsity=0.5,
                                                                 data_size_bytes=1000))




async def _code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def idle_upload(channel: grpc.aio.Channel, header: bool) -> grpc.StatusCode:
    """An UploadModel call that sends a header (or nothing) and then nothing more, never half-closing."""
    call = model_grpc.ModelServiceStub(channel).UploadModel()
    if header:
        try:
            await call.write(UPLOAD_HEADER)
        except grpc.aio.AioRpcError:  # refused before the write: the call's own status says why
            pass
    return await _code_of(call)


async def idle_optimize(channel: grpc.aio.Channel, options: bool = False) -> grpc.StatusCode:
    """An Optimize call that sends nothing (or only its options, announcing data it never sends)."""
    call = opt_grpc.OptimizeServiceStub(channel).Optimize()
    if options:
        try:
            await call.write(OPTIONS)
        except grpc.aio.AioRpcError:  # refused before the write: the call's own status says why
            pass
    return await _code_of(_drain(call))


async def _drain(call: grpc.aio.StreamStreamCall) -> None:
    async for _ in call:
        pass


async def idle_predict_stream(channel: grpc.aio.Channel) -> grpc.StatusCode:
    return await _code_of(_drain(inf_grpc.InferenceServiceStub(channel).PredictStream()))


async def idle_model_stream_infer(channel: grpc.aio.Channel) -> grpc.StatusCode:
    return await _code_of(_drain(v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()))


OPENERS: dict[str, Callable[[grpc.aio.Channel, int], Awaitable[grpc.StatusCode]]] = {
    "upload": lambda ch, i: idle_upload(ch, header=i % 2 == 0),
    "optimize": lambda ch, i: idle_optimize(ch),
    "predict_stream": lambda ch, i: idle_predict_stream(ch),
    "model_stream_infer": lambda ch, i: idle_model_stream_infer(ch),
}


def _unary_answers(address: str) -> None:
    """Unary Predict (leanserve.v1) and ModelInfer (V2) succeed with the right answers."""
    with Client(address, timeout=60) as c:
        for i in range(5):
            x = np.full((2, 3), i, np.float32)
            np.testing.assert_array_equal(c.predict("toy", x, timeout=60).outputs["y"], 2 * x)
            request = v2.ModelInferRequest(
                model_name="toy", inputs=[v2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32",
                                                                                 shape=x.shape)],
                raw_input_contents=[x.tobytes()])
            response = v2_grpc.GRPCInferenceServiceStub(c.channel).ModelInfer(request, timeout=60)
            out = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(response.outputs[0].shape)
            np.testing.assert_array_equal(out, 2 * x)


@pytest.mark.settings(stream_idle_timeout_seconds=IDLE_SECONDS, **LIMITS)
def test_idle_streams_of_every_kind_do_not_stop_unary_predict(toy_server: ServerHandle) -> None:
    address = f"127.0.0.1:{toy_server.port}"
    codes: dict[str, list[grpc.StatusCode]] = {kind: [] for kind in OPENERS}

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            async def one(kind: str, i: int) -> None:
                codes[kind].append(await OPENERS[kind](channel, i))

            tasks = [asyncio.ensure_future(one(kind, i)) for i in range(PER_KIND) for kind in OPENERS]
            # every call reached the server once all but the slot holders were refused
            while any(sum(len(codes[k]) for k in kinds) < PER_KIND * len(kinds) - slots
                      for kinds, slots in POOLS.items()):
                await asyncio.sleep(0.05)
            # the slots are full and 800 calls came in: unary calls are answered all the same
            await asyncio.to_thread(_unary_answers, address)
            # the slots were still held: one more call of each kind is refused at once
            for kind, opener in OPENERS.items():
                assert await opener(channel, 1) == grpc.StatusCode.RESOURCE_EXHAUSTED, kind
            await asyncio.gather(*tasks)  # the holders end after the idle timeout

    asyncio.run(scenario())
    for kinds, slots in POOLS.items():
        counted = Counter(code for kind in kinds for code in codes[kind])
        assert set(counted) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}, (kinds, counted)
        assert counted[grpc.StatusCode.DEADLINE_EXCEEDED] >= slots, (kinds, counted)
    # every slot is free again
    with Client(address, timeout=60) as c:
        x = np.ones((1, 3), np.float32)
        [answer] = c.stream("toy", [x])
        np.testing.assert_array_equal(answer.outputs["y"], 2 * x)


@pytest.mark.settings(stream_idle_timeout_seconds=1.0, max_open_uploads=1, max_open_optimizations=1)
def test_an_idle_upload_or_optimization_ends_with_deadline_exceeded_and_frees_its_slots(
        toy_server: ServerHandle) -> None:
    address = f"127.0.0.1:{toy_server.port}"

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            for header in (False, True):
                assert await idle_upload(channel, header) == grpc.StatusCode.DEADLINE_EXCEEDED
            # an Optimize that announced data and sent none held the only job slot: it is free again afterwards,
            # so the second one is not refused as "another optimization is running"
            for _ in range(2):
                assert await idle_optimize(channel, options=True) == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(2):
                assert await idle_predict_stream(channel) == grpc.StatusCode.DEADLINE_EXCEEDED
                assert await idle_model_stream_infer(channel) == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(scenario())
    wait_until(lambda: not [t for t in threading.enumerate() if t.name == "stream-reader"],
               "the stream readers of the ended calls stop")


async def probe(address: str, kind: str) -> grpc.StatusCode:
    """One short call of ``kind`` that ends at once either way: RESOURCE_EXHAUSTED without a slot, else what the
    call itself answers inside its slot (an invalid header, an unknown model, or OK with a prediction).

    Made with the blocking API on a thread: when a call is refused before its request is written, grpc.aio may
    report the failed write (INTERNAL "Failed execute_batch") instead of the server's status."""
    return await asyncio.to_thread(_probe, address, kind)


def _probe(address: str, kind: str) -> grpc.StatusCode:
    x = np.ones((1, 3), np.float32)
    with grpc.insecure_channel(address) as channel:
        try:
            if kind == "upload":
                bad = model_pb.UploadModelRequest(header=model_pb.UploadHeader(name="probe", size_bytes=1,
                                                                               sha256="x"))
                model_grpc.ModelServiceStub(channel).UploadModel(iter([bad]), timeout=60)
            elif kind == "optimize":
                options = opt_pb.OptimizeRequest(options=opt_pb.OptimizeOptions(model_name="nope",
                                                                                target_sparsity=0.5))
                list(opt_grpc.OptimizeServiceStub(channel).Optimize(iter([options]), timeout=60))
            elif kind == "predict_stream":
                list(inf_grpc.InferenceServiceStub(channel).PredictStream(iter([common.predict_request("toy", x)]),
                                                                          timeout=60))
            else:
                list(v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([_v2_request(x)]), timeout=60))
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _v2_request(x: np.ndarray) -> v2.ModelInferRequest:
    return v2.ModelInferRequest(
        model_name="toy", inputs=[v2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=x.shape)],
        raw_input_contents=[x.tobytes()])


ANSWERED_IN_SLOT = {"upload": grpc.StatusCode.INVALID_ARGUMENT, "optimize": grpc.StatusCode.NOT_FOUND,
                    "predict_stream": grpc.StatusCode.OK, "model_stream_infer": grpc.StatusCode.OK}


@pytest.mark.settings(stream_idle_timeout_seconds=300.0, max_open_uploads=2, max_open_optimizations=1)
def test_the_next_call_past_the_limit_is_refused_and_a_cancelled_call_frees_its_slot(
        toy_server: ServerHandle) -> None:
    """Per kind: hold as many calls as there are slots, the next one is RESOURCE_EXHAUSTED; cancel one held call
    and a new call gets its slot."""
    address = f"127.0.0.1:{toy_server.port}"
    limits = {"upload": 2, "optimize": 1, "predict_stream": 4, "model_stream_infer": 4}  # max_open_streams=4
    x = np.ones((1, 3), np.float32)

    async def hold(channel: grpc.aio.Channel, kind: str) -> object:
        # each held call sends a first message (a call that sent nothing may not be on the wire yet) and then
        # waits for more: an upload for its data, an optimization for the data its options announce
        if kind == "upload":
            call = model_grpc.ModelServiceStub(channel).UploadModel()
            await call.write(UPLOAD_HEADER)
            return call
        if kind == "optimize":
            call = opt_grpc.OptimizeServiceStub(channel).Optimize()
            await call.write(OPTIONS)
            return call
        for _ in range(600):  # both predict stream kinds share one pool: the last kind's slots free in their time
            if kind == "predict_stream":
                call = inf_grpc.InferenceServiceStub(channel).PredictStream()
                await call.write(common.predict_request("toy", x))
            else:
                call = v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
                await call.write(_v2_request(x))
            try:
                await call.read()  # answered: the stream holds its slot
                return call
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            await asyncio.sleep(0.05)
        pytest.fail(f"{kind}: no slot for a held stream")

    async def until(kind: str, channel: grpc.aio.Channel, want: Callable[[grpc.StatusCode], bool]) -> grpc.StatusCode:
        for _ in range(600):  # the held calls reach the server in their own time: probe until they have
            code = await probe(address, kind)
            if want(code):
                return code
            await asyncio.sleep(0.05)
        pytest.fail(f"{kind}: never saw the wanted answer, last {code}")

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            for kind, limit in limits.items():
                assert await probe(address, kind) == ANSWERED_IN_SLOT[kind], kind
                held = [await hold(channel, kind) for _ in range(limit)]
                await until(kind, channel, lambda c: c == grpc.StatusCode.RESOURCE_EXHAUSTED)
                held[0].cancel()  # type: ignore[attr-defined]
                code = await until(kind, channel, lambda c: c != grpc.StatusCode.RESOURCE_EXHAUSTED)
                assert code == ANSWERED_IN_SLOT[kind], (kind, code)
                for call in held[1:]:
                    call.cancel()  # type: ignore[attr-defined]
                await until(kind, channel, lambda c: c != grpc.StatusCode.RESOURCE_EXHAUSTED)

    asyncio.run(scenario())
