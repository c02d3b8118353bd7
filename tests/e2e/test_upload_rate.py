"""The minimum data rate (``upload_min_bytes_per_second``): an UploadModel or Optimize stream whose data trickles in
below it, once ``stream_idle_timeout_seconds`` have passed since its first message, ends with DEADLINE_EXCEEDED and
frees its slot; empty chunks count zero bytes; data at a normal rate is not affected.

Tricklers send a message well within the idle timeout, so only the rate can end them, and are bounded in messages
(far past the moment the rate cuts them); nothing here asserts a duration."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client, common
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import model_service_pb2_grpc as model_grpc
from leanserve.v1 import optimize_service_pb2 as opt_pb
from leanserve.v1 import optimize_service_pb2_grpc as opt_grpc
from leanserve.server.app import ServerHandle
from tests.toy import wait_until

IDLE_SECONDS = 1.0
MIN_RATE = 2000  # bytes/s
TRICKLE_EVERY = 0.2  # seconds: well within the idle timeout
TRICKLE_MESSAGES = 60  # 12 s of trickle: far past the moment the minimum rate ends the call
PACED_CHUNK = 1024  # a normal client: 10 KiB/s, five times the minimum, for longer than the idle timeout
PACED_EVERY = 0.1
RATE = {"stream_idle_timeout_seconds": IDLE_SECONDS, "upload_min_bytes_per_second": MIN_RATE}




def _address(handle: ServerHandle) -> str:
    return f"127.0.0.1:{handle.port}"


def _plan_file(folder: Path, features: int = 64) -> Path:
    """A ``.leanserve`` file of one ``features`` × ``features`` linear layer (about 16 KiB at 64; no TensorFlow)."""
    from leanserve.server.repository import artifacts
    from leanserve.server.runtime.plan import LayerSpec, build_plan

    rng = np.random.default_rng(0)
    plan = build_plan((features,), [LayerSpec("o", rng.normal(size=(features, features)).astype(np.float32),
                                              np.zeros(features, np.float32), "linear")])
    manifest, blob = artifacts.plan_to_files(plan, "x", "y")
    path = folder / "plan.leanserve"
    artifacts.write_zip(path, manifest, blob)
    return path


def _trickle(first: object, chunk: object, stop: threading.Event) -> Iterator[object]:
    yield first
    for _ in range(TRICKLE_MESSAGES):
        if stop.wait(TRICKLE_EVERY):
            return
        yield chunk


def _trickle_upload(address: str, payload: bytes, stop: threading.Event) -> grpc.RpcError | None:
    """An upload declaring 1 MiB that then sends ``payload`` every TRICKLE_EVERY seconds; the error it ends with."""
    header = model_pb.UploadModelRequest(header=model_pb.UploadHeader(name="slow", size_bytes=1 << 20,
                                                                      sha256="0" * 64))
    with grpc.insecure_channel(address) as channel:
        try:
            model_grpc.ModelServiceStub(channel).UploadModel(
                _trickle(header, model_pb.UploadModelRequest(chunk=payload), stop), timeout=60)
        except grpc.RpcError as exc:
            return exc
    return None


def _optimize_options(size: int) -> opt_pb.OptimizeRequest:
    return opt_pb.OptimizeRequest(options=opt_pb.OptimizeOptions(model_name="toy", target_sparsity=0.5,
                                                                 data_size_bytes=size))


def _optimize(address: str, messages: Iterator[object]) -> grpc.RpcError | None:
    with grpc.insecure_channel(address) as channel:
        try:
            list(opt_grpc.OptimizeServiceStub(channel).Optimize(messages, timeout=60))
        except grpc.RpcError as exc:
            return exc
    return None


def _paced(first: object, blob: bytes, message: type, field: str) -> Iterator[object]:
    """``first``, then ``blob`` in PACED_CHUNK pieces every PACED_EVERY seconds."""
    yield first
    for i in range(0, len(blob), PACED_CHUNK):
        time.sleep(PACED_EVERY)
        yield message(**{field: blob[i:i + PACED_CHUNK]})


@pytest.mark.parametrize("payload", [b"", b"x"], ids=["empty-chunks", "one-byte-chunks"])
@pytest.mark.settings(max_open_uploads=1, **RATE)
def test_an_upload_trickling_below_the_minimum_rate_ends_and_frees_its_slot(
        toy_server: ServerHandle, tmp_path: Path, payload: bytes) -> None:
    stop = threading.Event()
    try:
        exc = _trickle_upload(_address(toy_server), payload, stop)
    finally:
        stop.set()
    assert exc is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    details = exc.details()
    assert "upload too slow" in details and f"minimum of {MIN_RATE} bytes/s" in details, details
    if not payload:  # empty chunks are no progress, and the declared size never counts
        assert " 0 bytes in " in details, details
    # the only upload slot is free again
    with Client(_address(toy_server), timeout=60) as c:
        assert c.upload(_plan_file(tmp_path), "after").version == 1


@pytest.mark.settings(max_open_uploads=1, **RATE)
def test_a_second_client_gets_the_only_upload_slot_once_the_trickler_is_cut(
        toy_server: ServerHandle, tmp_path: Path) -> None:
    path = _plan_file(tmp_path)
    readers_before = {t for t in threading.enumerate() if t.name == "stream-reader"}
    stop = threading.Event()
    ended: list[grpc.RpcError | None] = []
    trickler = threading.Thread(target=lambda: ended.append(_trickle_upload(_address(toy_server), b"x", stop)),
                                daemon=True)
    trickler.start()
    codes: list[grpc.StatusCode] = []
    try:
        # the upload's reader thread starts once its call holds the slot
        wait_until(lambda: any(t.name == "stream-reader" and t not in readers_before for t in threading.enumerate()),
                   "the trickler holds the upload slot")
        with Client(_address(toy_server), timeout=60) as c:
            for _ in range(40):  # 4 s: well before the trickler would end on its own
                try:
                    assert c.upload(path, "victim").version == 1
                    codes.append(grpc.StatusCode.OK)
                    break
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                time.sleep(0.1)
    finally:
        stop.set()
        trickler.join(30)
    assert codes[0] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes  # the trickler held the slot at first
    assert codes[-1] == grpc.StatusCode.OK and set(codes[:-1]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert ended and ended[0] is not None and ended[0].code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended


@pytest.mark.settings(**RATE)
def test_an_upload_at_a_normal_rate_is_not_affected(toy_server: ServerHandle, tmp_path: Path) -> None:
    path = _plan_file(tmp_path)
    with Client(_address(toy_server), timeout=60) as c:
        assert c.upload(path, "fast").version == 1
    # slower than one message per idle timeout could carry, above the minimum, lasting past the idle timeout
    header, *chunks = common.upload_messages(path, "paced")
    blob = b"".join(m.chunk for m in chunks)
    assert len(blob) / (PACED_CHUNK / PACED_EVERY) > 1.5 * IDLE_SECONDS
    with grpc.insecure_channel(_address(toy_server)) as channel:
        answer = model_grpc.ModelServiceStub(channel).UploadModel(
            _paced(header, blob, model_pb.UploadModelRequest, "chunk"), timeout=60)
    assert answer.model.name == "paced" and answer.model.version == 1


@pytest.mark.settings(max_open_optimizations=1, **RATE)
def test_optimization_data_trickling_below_the_minimum_rate_ends_and_frees_its_slots(
        toy_server: ServerHandle) -> None:
    for payload in (b"x", b""):  # the second call is not refused: the call slot and the job slot are free again
        stop = threading.Event()
        try:
            exc = _optimize(_address(toy_server),
                            _trickle(_optimize_options(1 << 20), opt_pb.OptimizeRequest(data_chunk=payload), stop))
        finally:
            stop.set()
        assert exc is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
        assert "optimization data too slow" in exc.details(), exc.details()


@pytest.mark.settings(max_open_optimizations=1, **RATE)
def test_optimization_data_at_a_normal_rate_is_received_whole(toy_server: ServerHandle) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((500, 8), np.float32))  # 16 KB: about 1.6 s at the paced rate
    blob = buf.getvalue()
    exc = _optimize(_address(toy_server),
                    _paced(_optimize_options(len(blob)), blob, opt_pb.OptimizeRequest, "data_chunk"))
    # received whole and read: the toy model takes rows of any width, which the data check refuses by name
    assert exc is not None and exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
    assert "x rows have shape [8]" in exc.details(), exc.details()
