"""Runs in its own process (tritonclient's `inference` descriptors clash with ours in one pool, kserve#3099).

``python tritonclient_script.py client <url> <model> <x.npy>``: talks to a server with tritonclient.grpc and prints
one JSON object with what it saw. ``python tritonclient_script.py matrix ...``: one failing request (see
``matrix``). ``python tritonclient_script.py descriptors``: prints tritonclient's compiled ``inference`` messages
and RPCs (see ``describe``) so a test can compare them with ours.
"""

from __future__ import annotations

import json
import queue
import sys
from types import ModuleType
from typing import Any


def describe(module: ModuleType) -> dict[str, Any]:
    """Every message's fields (name, number, type, repeated, message type, oneof) and every RPC's signature."""
    out: dict[str, Any] = {}

    def walk(msg: Any, prefix: str) -> None:
        for nested in msg.nested_types:
            walk(nested, f"{prefix}{msg.name}.")
        out[prefix + msg.name] = sorted(
            [f.name, f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else "",
             f.containing_oneof.name if f.containing_oneof else ""]
            for f in msg.fields
        )

    for msg in module.DESCRIPTOR.message_types_by_name.values():
        walk(msg, "")
    service = module.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    out["rpc"] = {
        m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
        for m in service.methods
    }
    return out


def client(url: str, model: str, x_path: str) -> dict[str, Any]:
    import numpy as np
    import tritonclient.grpc as tc

    x = np.load(x_path)
    c = tc.InferenceServerClient(url)
    out: dict[str, Any] = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "model_ready": c.is_model_ready(model),
        "unknown_model_ready": c.is_model_ready("no-such-model"),
        "server_metadata": c.get_server_metadata(as_json=True),
        "model_metadata": c.get_model_metadata(model, as_json=True),
    }
    in_name = out["model_metadata"]["inputs"][0]["name"]
    out_name = out["model_metadata"]["outputs"][0]["name"]

    def inputs(rows: Any) -> list[Any]:
        tensor = tc.InferInput(in_name, list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)  # binary: travels in raw_input_contents
        return [tensor]

    for n in (1, 16):
        result = c.infer(model, inputs(x[:n]), outputs=[tc.InferRequestedOutput(out_name)], request_id=f"u{n}")
        out[f"infer_{n}"] = result.as_numpy(out_name).tolist()
        out[f"infer_{n}_response"] = result.get_response(as_json=True)["id"]

    answers: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    requests = [(model, str(i)) for i in range(len(x))]
    requests.insert(5, ("no-such-model", "bad"))
    for name, rid in requests:
        rows = x[int(rid): int(rid) + 1] if rid != "bad" else x[:1]
        c.async_stream_infer(name, inputs(rows), request_id=rid)
    stream = []
    for _ in requests:
        result, error = answers.get(timeout=60)
        if error is not None:
            stream.append({"error": str(error)})
        else:
            stream.append({"id": result.get_response().id, "y": result.as_numpy(out_name).tolist()})
    c.stop_stream()
    out["stream"] = stream
    c.close()
    return out


def _error(error: Any) -> dict[str, Any] | None:
    if error is None:
        return None
    status = error.status()
    return {"status": str(status).removeprefix("StatusCode.") if status else None, "message": error.message()}


def matrix(url: str, model: str, mode: str, cols: str, timeout: str, cancel: str) -> dict[str, Any]:
    """One request of one row to ``model`` (input "x", ``cols`` FP32 values) with tritonclient, unary or inside a
    stream; prints what came back. ``timeout`` > 0: the call's (or stream's) deadline in seconds. ``cancel`` = "1":
    print "sent" once the request is out, wait for a line on stdin, then cancel the call (or the stream). In a
    stream without a deadline or cancellation, a second request to the model "ok" follows the first, to show the
    stream goes on after an error."""
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    def inputs(name: str, width: int) -> list[Any]:
        tensor = tc.InferInput("x", [1, width], "FP32")
        tensor.set_data_from_numpy(np.ones((1, width), np.float32))
        return [tensor]

    c = tc.InferenceServerClient(url)
    deadline = float(timeout) or None
    out: dict[str, Any] = {}
    answers: queue.Queue = queue.Queue()
    if mode == "unary":
        if cancel == "1":
            call = c.async_infer(model, inputs(model, int(cols)), request_id="bad",
                                 callback=lambda result, error: answers.put((result, error)))
            print("sent", flush=True)
            sys.stdin.readline()
            call.cancel()
            result, error = answers.get(timeout=60)
        else:
            result, error = None, None
            try:
                result = c.infer(model, inputs(model, int(cols)), request_id="bad", client_timeout=deadline)
            except InferenceServerException as exc:
                error = exc
        out["first"] = {"error": _error(error), "id": result.get_response().id if result else None}
    else:
        c.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=deadline)
        c.async_stream_infer(model, inputs(model, int(cols)), request_id="bad")
        if cancel == "1":
            print("sent", flush=True)
            sys.stdin.readline()
            c.stop_stream(cancel_requests=True)
        result, error = answers.get(timeout=60)
        out["first"] = {"error": _error(error), "id": result.get_response().id if result else None}
        if cancel != "1" and deadline is None:
            c.async_stream_infer("ok", inputs("ok", 4), request_id="good")
            result, error = answers.get(timeout=60)
            out["next"] = {"error": _error(error), "id": result.get_response().id if result else None,
                           "y": result.as_numpy("y").tolist() if result else None}
            c.stop_stream()
    c.close()
    return out


if __name__ == "__main__":
    if sys.argv[1] == "descriptors":
        from tritonclient.grpc import service_pb2

        print(json.dumps(describe(service_pb2)))
    elif sys.argv[1] == "matrix":
        print(json.dumps(matrix(*sys.argv[2:8])), flush=True)
    else:
        print(json.dumps(client(*sys.argv[2:5])))
