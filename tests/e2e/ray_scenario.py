"""``leanserve ray`` on a 2-node Ray cluster, run INSIDE a loopback-only network namespace (see test_ray.py).

``python ray_scenario.py OUT.json``: refuses to run if any interface but ``lo`` exists (Ray would advertise it).
Starts a real S3 server (rclone) and a 2-node Ray cluster on 127.0.0.1, publishes version 1 with ``leanserve
publish``, runs ``leanserve ray --replicas 2`` on that store, then through the Ray gRPC proxy: finds which node
and replica answer (trailing metadata), sends 100 V2 ModelInfer calls with tritonclient (another process:
tritonclient's descriptors clash with ours), publishes version 2 while that load runs, waits until both replicas
answer version 2, sends SIGTERM and checks the application is gone. Writes what it saw to OUT.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.s3server import free_port, rclone_s3  # noqa: E402

BIN = Path(sys.executable).parent
LEANSERVE = [sys.executable, "-m", "leanserve.server.cli"]
RAY = str(BIN / "ray")

TRITON_LOAD = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
url, x_path, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = np.load(x_path)
c = tc.InferenceServerClient(url)
out = []
for i in range(calls):
    rows = x[i % len(x): i % len(x) + 1]
    t = tc.InferInput("x", list(rows.shape), "FP32")
    t.set_data_from_numpy(rows)
    r = c.infer("m", [t], model_version="1", outputs=[tc.InferRequestedOutput("y")])
    out.append(r.as_numpy("y").tolist())
print(json.dumps(out))
"""


def interfaces() -> list[str]:
    """Network interfaces of this process's namespace (from the kernel, not /sys, which may be the host's)."""
    import socket

    return sorted(name for _, name in socket.if_nameindex())


def toy_model(path: Path, seed: int) -> object:
    from leanserve.server.repository import artifacts
    from leanserve.server.runtime.plan import LayerSpec, build_plan

    rng = np.random.default_rng(seed)
    plan = build_plan((12,), [LayerSpec("h", rng.normal(size=(12, 16)).astype(np.float32),
                                        rng.normal(size=16).astype(np.float32), "relu"),
                              LayerSpec("o", rng.normal(size=(16, 4)).astype(np.float32),
                                        np.zeros(4, np.float32), "softmax")])
    manifest, blob = artifacts.plan_to_files(plan, "x", "y")
    artifacts.write_zip(path, manifest, blob)
    return plan


def run(out_path: Path) -> None:
    found = interfaces()
    if found != ["lo"]:
        raise SystemExit(f"refusing to start Ray outside a loopback-only namespace (interfaces: {found})")
    report: dict = {"interfaces": found}
    work = Path(tempfile.mkdtemp(prefix="leanserve-ray-"))
    with rclone_s3(work / "s3") as s3:
        uri = f"{s3.bucket('models')}/ray"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEANSERVE_")}
        env.update(s3.env(work), RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="0", TF_CPP_MIN_LOG_LEVEL="3",
                   RAY_USAGE_STATS_ENABLED="0", LEANSERVE_REPOSITORY_CACHE_DIR=str(work / "cache"),
                   LEANSERVE_REPOSITORY_POLL_SECONDS="0.5")
        plans = {v: toy_model(work / f"m{v}.leanserve", v) for v in (1, 2)}
        x = np.random.default_rng(0).normal(size=(100, 12)).astype(np.float32)
        np.save(work / "x.npy", x)

        gcs_port = free_port()
        started = time.monotonic()
        subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                        "--num-cpus", "1", "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{gcs_port}", "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--disable-usage-stats"], env=env, check=True, capture_output=True)
        report["cluster_seconds"] = time.monotonic() - started
        ray_proc = None
        try:
            done = subprocess.run([*LEANSERVE, "publish", str(work / "m1.leanserve"), "--name", "m",
                                   "--repository", uri], env=env, capture_output=True, text=True, check=True)
            report["published_first"] = done.stdout.strip()

            grpc_port = free_port()
            log = open(work / "leanserve-ray.log", "w")
            ray_proc = subprocess.Popen(
                [*LEANSERVE, "ray", "--address", f"127.0.0.1:{gcs_port}", "--replicas", "2", "--port",
                 str(grpc_port), "--repository", uri, "--node-ip-address", "127.0.0.1"], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
            assert ray_proc.stdout is not None
            first = ray_proc.stdout.readline()
            report["first_line"] = first.strip()
            if not first.startswith("listening on"):
                raise RuntimeError(f"leanserve ray did not start: {first!r}\n{(work / 'leanserve-ray.log').read_text()[-5000:]}")
            report["start_seconds"] = time.monotonic() - started
            address = f"127.0.0.1:{grpc_port}"

            import grpc

            from leanserve.v2 import grpc_service_pb2 as pb
            from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc

            channel = grpc.insecure_channel(address)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def who(call) -> tuple[str, str]:
                md = dict(call.trailing_metadata() or ())
                return md.get("leanserve-ray-node", ""), md.get("leanserve-ray-replica", "")

            seen = {}
            for _ in range(200):
                _, call = stub.ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=30)
                node, replica = who(call)
                seen[replica] = node
                if len(seen) >= 2:
                    break
            report["replicas"] = seen

            # 100 V2 ModelInfer calls with tritonclient, while version 2 is published
            load = subprocess.Popen([sys.executable, "-c", TRITON_LOAD, address, str(work / "x.npy"), "100"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            done = subprocess.run([*LEANSERVE, "publish", str(work / "m2.leanserve"), "--name", "m",
                                   "--repository", uri], env=env, capture_output=True, text=True, check=True)
            report["published_second"] = done.stdout.strip()
            out, err = load.communicate(timeout=600)
            if load.returncode != 0:
                raise RuntimeError(f"tritonclient load failed: {err[-3000:]}")
            got = np.asarray(json.loads(out), np.float32).reshape(100, 4)
            expected = plans[1].reference(x)
            report["triton_calls"] = len(got)
            report["triton_max_abs_error"] = float(np.max(np.abs(got - expected)))

            # version 2 through the proxy until both replicas have answered it correctly
            request = pb.ModelInferRequest(model_name="m", model_version="2")
            request.inputs.add(name="x", datatype="FP32", shape=[4, 12])
            request.raw_input_contents.append(x[:4].tobytes())
            v2_by_replica: dict[str, float] = {}
            not_yet = 0
            deadline = time.monotonic() + 120
            while len(v2_by_replica) < 2 and time.monotonic() < deadline:
                try:
                    response, call = stub.ModelInfer.with_call(request, timeout=30)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    not_yet += 1  # that replica has not polled the store since the publish
                    time.sleep(0.05)
                    continue
                y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(4, 4)
                v2_by_replica[who(call)[1]] = float(np.max(np.abs(y - plans[2].reference(x[:4]))))
            report["v2_by_replica"] = v2_by_replica
            report["v2_not_found_before_poll"] = not_yet

            # the other RPCs through the proxy: a refused call's status, a V2 stream, leanserve.v1 unary and stream
            try:
                stub.ModelInfer(pb.ModelInferRequest(model_name="nope"), timeout=30)
                report["unknown_model_status"] = "OK"
            except grpc.RpcError as exc:
                report["unknown_model_status"] = exc.code().name
            ok = pb.ModelInferRequest(model_name="m", model_version="1")
            ok.inputs.add(name="x", datatype="FP32", shape=[1, 12])
            ok.raw_input_contents.append(x[:1].tobytes())
            bad = pb.ModelInferRequest(model_name="nope", id="bad")
            answers = list(stub.ModelStreamInfer(iter([ok, bad, ok]), timeout=60))
            report["stream_errors"] = [a.error_message.split(":")[0] for a in answers]
            report["stream_max_abs_error"] = max(
                float(np.max(np.abs(np.frombuffer(a.infer_response.raw_output_contents[0], np.float32)
                                    - plans[1].reference(x[:1])[0]))) for a in answers if not a.error_message)

            from leanserve.server.grpc.converters import fill_tensor, tensor_to_numpy
            from leanserve.v1 import inference_service_pb2 as v1
            from leanserve.v1 import inference_service_pb2_grpc as v1_grpc

            v1_stub = v1_grpc.InferenceServiceStub(channel)
            pr = v1.PredictRequest(model_name="m", model_version=2, request_id="p")
            fill_tensor(pr.inputs.add(), "x", x[:3])
            got_v1 = tensor_to_numpy(v1_stub.Predict(pr, timeout=30).outputs[0])
            report["v1_predict_max_abs_error"] = float(np.max(np.abs(got_v1 - plans[2].reference(x[:3]))))
            bad_v1 = v1.PredictRequest(model_name="nope", request_id="b")
            streamed = list(v1_stub.PredictStream(iter([pr, bad_v1, pr]), timeout=60))
            report["v1_stream_codes"] = [r.error.code for r in streamed]
            channel.close()

            ray_proc.send_signal(signal.SIGTERM)
            report["exit_code"] = ray_proc.wait(120)
            import ray
            from ray import serve

            ray.init(address=f"127.0.0.1:{gcs_port}", namespace="leanserve", logging_level="ERROR",
                     log_to_driver=False, _node_ip_address="127.0.0.1")
            report["apps_after_sigterm"] = sorted(serve.status().applications)
            ray.shutdown()
        finally:
            if ray_proc is not None and ray_proc.poll() is None:
                ray_proc.kill()
            subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
            report["log_tail"] = (work / "leanserve-ray.log").read_text()[-3000:] \
                if (work / "leanserve-ray.log").exists() else ""
            out_path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    run(Path(sys.argv[1]))
