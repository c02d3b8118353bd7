"""The load of bench/soak.py: what each kind of call saw (``Record``, ``classify``), the tritonclient V2 callers
(separate processes: tritonclient's protobuf descriptors clash with ours in one process) and the native callers,
uploads, deletes and the optimization (threads of ``SoakLoad``). Every loop is bounded in time and count, every
call has a timeout.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CALL_TIMEOUT_S = 30.0
KILL_CODES = {"UNAVAILABLE", "CANCELLED"}  # how a call in flight on a killed process ends
#: a call started this long after the SIGKILL can still go out on a connection to the killed process (the client
#: learns of its end only when the kernel resets the connection): it fails like the calls in flight
KILL_GRACE_S = 0.25
#: clock slack between the load's processes and the one that kills
CLOCK_SLACK_S = 0.5
OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # each caller on its own TCP connection: spread over processes
RECONNECT_EVERY = 300  # calls per connection of a closed-loop unary caller (streams: every 10 streams)


# -- records -----------------------------------------------------------------------------------------------------
@dataclass
class Record:
    """What one kind of call saw: each call's (start, end, status) relative to the run's start."""

    kind: str
    calls: list[tuple[float, float, str]] = field(default_factory=list)
    wrong_answers: int = 0
    #: the first few messages of failed calls, by message
    details: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, start: float, end: float, status: str, detail: str = "") -> None:
        with self.lock:
            self.calls.append((start, end, status))
            if status != "OK" and (detail in self.details or len(self.details) < 20):
                self.details[f"{status}: {detail[:160]}"] += 1


def classify(calls: list[tuple[float, float, str]], kill_t: float | None,
             ok: frozenset[str] = frozenset({"OK"})) -> dict[str, Any]:
    """Counts by status, split into expected, in flight on the killed process (a kill code, and the call overlaps
    the kill, up to ``KILL_GRACE_S`` after it), and lost."""
    by_code = Counter(status for _, _, status in calls)
    in_flight = lost = 0
    lost_codes: Counter[str] = Counter()
    for start, end, status in calls:
        if status in ok:
            continue
        if (kill_t is not None and status in KILL_CODES
                and start <= kill_t + KILL_GRACE_S and end + CLOCK_SLACK_S >= kill_t):
            in_flight += 1
        else:
            lost += 1
            lost_codes[status] += 1
    failures = sorted((round(s, 2), round(e, 2), status) for s, e, status in calls if status not in ok)
    return {"calls": len(calls), "by_code": dict(by_code), "in_flight_on_killed": in_flight, "lost": lost,
            "lost_by_code": dict(lost_codes), "failures": failures[:100]}


# -- V2 load in separate processes (tritonclient only there) ----------------------------------------------------
def v2_worker(target: str, model: str, threads: int, x: np.ndarray, expected: np.ndarray, t0: float,
               end: float, out: Any) -> None:
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    calls: list[tuple[float, float, str]] = []
    wrong = [0]
    lock = threading.Lock()

    def loop() -> None:
        client = tc.InferenceServerClient(target, channel_args=OPTIONS)
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        for i in range(10_000_000):
            start = time.time()
            if start >= end:
                break
            if i and i % RECONNECT_EVERY == 0:  # clients come and go: connections spread over both processes
                client.close()
                client = tc.InferenceServerClient(target, channel_args=OPTIONS)
            status = "OK"
            try:
                result = client.infer(model, [inp], client_timeout=CALL_TIMEOUT_S)
                if not np.allclose(result.as_numpy("y"), expected, atol=1e-4):
                    with lock:
                        wrong[0] += 1
            except InferenceServerException as exc:
                status = (exc.status() or "UNKNOWN").replace("StatusCode.", "")
            with lock:
                calls.append((start - t0, time.time() - t0, status))
            if status != "OK":
                time.sleep(0.05)  # no busy spin against a failing server
        client.close()

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(max(1.0, end - time.time() + CALL_TIMEOUT_S + 5))
    out.put((calls, wrong[0]))


# -- native load in threads ------------------------------------------------------------------------------------
class SoakLoad:
    """The records of one run and the threads that load the server (``target``, set before the threads start)."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.repository = tmp / "repo"
        self.records = {k: Record(k) for k in ("v2_unary", "native_unary", "native_stream", "upload", "delete",
                                               "optimize")}
        self.stream_requests = Record("native_stream_requests")
        self.acknowledged: set[tuple[str, int]] = set()
        self.deleted: set[tuple[str, int]] = set()
        self.ack_lock = threading.Lock()
        self.rss: list[dict[str, Any]] = []
        self.events: dict[str, float] = {}
        self.target = ""  # the server, host:port (set by the run before any thread starts)
        self.t0 = 0.0
        self.end = 0.0

    def now(self) -> float:
        return time.time() - self.t0

    # -- load threads ----------------------------------------------------------------------------------------
    def _calls(self, reconnect_every: int) -> Iterator[tuple[float, Any]]:
        """(start, client) for each call until the run ends, on a fresh connection every ``reconnect_every`` calls
        (clients come and go: connections spread over both processes)."""
        import grpc

        from leanserve.client import Client

        def connect() -> Client:
            return Client(channel=grpc.insecure_channel(self.target, options=OPTIONS), timeout=CALL_TIMEOUT_S)

        client = connect()
        try:
            for i in range(10_000_000):
                if time.time() >= self.end:
                    return
                if i and i % reconnect_every == 0:
                    client.close()
                    client = connect()
                yield self.now(), client
        finally:
            client.close()

    def native_unary(self, x: np.ndarray, expected: np.ndarray) -> None:
        import grpc

        from leanserve.client import common as ccommon

        rec = self.records["native_unary"]
        request = ccommon.predict_request("stable", x)
        for start, c in self._calls(RECONNECT_EVERY):
            status = "OK"
            detail = ""
            try:
                answer = c.inference_stub.Predict(request, timeout=CALL_TIMEOUT_S, wait_for_ready=True)
                if not np.allclose(ccommon.outputs(answer)["y"], expected, atol=1e-4):
                    rec.wrong_answers += 1
            except grpc.RpcError as exc:
                status, detail = exc.code().name, exc.details() or ""
            rec.add(start, self.now(), status, detail)
            if status != "OK":
                time.sleep(0.05)

    def native_stream(self, x: np.ndarray, expected: np.ndarray) -> None:
        import grpc

        from leanserve.client import common as ccommon

        rec, per_request = self.records["native_stream"], self.stream_requests
        requests = [ccommon.predict_request("stable", x, request_id=str(i)) for i in range(20)]
        for start, c in self._calls(10):
            status = "OK"
            try:
                for answer in c.inference_stub.PredictStream(iter(requests), timeout=CALL_TIMEOUT_S,
                                                              wait_for_ready=True):
                    if answer.HasField("error"):
                        code = next((s.name for s in grpc.StatusCode if s.value[0] == answer.error.code),
                                    str(answer.error.code))
                        per_request.add(start, self.now(), code, answer.error.message)
                        continue
                    per_request.add(start, self.now(), "OK")
                    if not np.allclose(ccommon.outputs(answer)["y"], expected, atol=1e-4):
                        rec.wrong_answers += 1
            except grpc.RpcError as exc:
                status = exc.code().name
            rec.add(start, self.now(), status)
            if status != "OK":
                time.sleep(0.05)

    def uploads(self, model_file: Path) -> None:
        import grpc

        from leanserve.client import Client, common as ccommon

        rec = self.records["upload"]
        with Client(channel=grpc.insecure_channel(self.target, options=OPTIONS), timeout=120) as c:
            for _ in range(100_000):
                if time.time() >= self.end - 2:
                    return
                start = self.now()
                status = "OK"
                try:
                    info = c.models_stub.UploadModel(ccommon.upload_messages(model_file, "churn"), timeout=120,
                                                     wait_for_ready=True).model
                    with self.ack_lock:
                        self.acknowledged.add(("churn", info.version))
                except grpc.RpcError as exc:
                    status = exc.code().name
                rec.add(start, self.now(), status)
                time.sleep(self.args.upload_every)

    def deletes(self) -> None:
        import grpc

        from leanserve.client import Client
        from leanserve.v1 import model_service_pb2 as model_pb

        rec = self.records["delete"]
        with Client(channel=grpc.insecure_channel(self.target, options=OPTIONS), timeout=60) as c:
            for _ in range(100_000):
                if time.time() >= self.end - 2:
                    return
                time.sleep(self.args.upload_every * 1.5)
                with self.ack_lock:
                    live = sorted(v for n, v in self.acknowledged - self.deleted if n == "churn")
                if len(live) <= 3:
                    continue
                start = self.now()
                status = "OK"
                try:
                    c.models_stub.DeleteModel(model_pb.DeleteModelRequest(name="churn", version=live[0]), timeout=60,
                                              wait_for_ready=True)
                except grpc.RpcError as exc:
                    status = exc.code().name
                rec.add(start, self.now(), status)
                if status in ("OK", "NOT_FOUND"):
                    with self.ack_lock:
                        self.deleted.add(("churn", live[0]))

    def optimize(self) -> None:
        import grpc

        from leanserve.v1 import optimize_service_pb2 as opt_pb
        from leanserve.v1 import optimize_service_pb2_grpc as opt_grpc

        rec = self.records["optimize"]
        time.sleep(min(3.0, self.args.duration * 0.05))
        request = opt_pb.OptimizeRequest(options=opt_pb.OptimizeOptions(
            model_name="opt", quantization=opt_pb.INT8_DYNAMIC, max_accuracy_drop=1.0, promote=True))
        start = self.now()
        status = "OK"
        with grpc.insecure_channel(self.target, options=OPTIONS) as channel:
            try:
                for event in opt_grpc.OptimizeServiceStub(channel).Optimize(iter([request]), timeout=600,
                                                                             wait_for_ready=True):
                    if event.HasField("report"):
                        with self.ack_lock:
                            self.acknowledged.add(("opt", event.report.version))
            except grpc.RpcError as exc:
                status = exc.code().name
        rec.add(start, self.now(), status)
        self.events["optimize_done"] = self.now()
