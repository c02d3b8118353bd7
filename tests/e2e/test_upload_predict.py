"""Upload over gRPC, predict, compare with Keras; restart on the same repository; versions and deletes."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client, codec, common
from leanserve.client.client import StreamError
from leanserve.server.app import create_server
from leanserve.server.repository import artifacts
from leanserve.server.runtime.plan import LayerSpec, build_plan
from tests.conftest import make_settings


def _rows(n: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


@pytest.mark.parametrize("which", ["seed_h5", "seed_keras"])
def test_seed_mlp_served_by_plan_matches_keras(client: Client, model_files, keras_predict, which: str) -> None:
    info = client.upload(model_files[which], "seed")
    assert info.version == 1 and info.runtime == "plan"
    assert [layer.format for layer in info.layers] == ["dense_f32"] * 3
    assert [(layer.in_features, layer.out_features) for layer in info.layers] == [(1000, 128), (128, 64), (64, 10)]
    assert info.reference.passed and info.reference.reference == "keras" and info.reference.samples == 128
    assert info.reference.max_abs_error < 1e-5
    for batch in (1, 7, 256):
        x = _rows(batch, 1000, seed=batch)
        out = client.predict("seed", x)
        assert out.model_version == 1 and out.output.shape == (batch, 10) and out.output.dtype == np.float32
        np.testing.assert_allclose(out.output, keras_predict(model_files[which], x), atol=1e-5, rtol=0)


def test_functional_batchnorm_dropout_flatten(client: Client, model_files, keras_predict) -> None:
    info = client.upload(model_files["bn_keras"], "bn")
    assert info.runtime == "plan"
    assert len(info.layers) == 2  # BatchNormalization folded, Dropout removed, Activation fused
    assert list(info.inputs[0].shape) == [-1, 8, 8]
    x = _rows(33, 8, 8)
    np.testing.assert_allclose(client.predict("bn", x).output, keras_predict(model_files["bn_keras"], x), atol=1e-5)


def test_restart_serves_the_same_versions(repo_dir: Path, model_files, keras_predict) -> None:
    x = _rows(16, 1000)
    handle = create_server(make_settings(repo_dir))
    try:
        with Client(f"127.0.0.1:{handle.port}") as c:
            c.upload(model_files["seed_h5"], "seed")
            c.upload(model_files["seed_keras"], "seed")
            before = c.predict("seed", x, version=1).output
    finally:
        handle.stop(0.5)
    handle = create_server(make_settings(repo_dir))
    try:
        with Client(f"127.0.0.1:{handle.port}") as c:
            assert c.models() == {"seed": [1, 2]}
            after = c.predict("seed", x, version=1).output
            assert c.info("seed").version == 2
    finally:
        handle.stop(0.5)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(after, keras_predict(model_files["seed_h5"], x), atol=1e-5)


def test_model_outside_plan_is_served_by_tensorflow(client: Client, model_files, keras_predict) -> None:
    info = client.upload(model_files["layernorm_keras"], "ln")
    assert info.runtime == "tensorflow" and not info.layers
    x = _rows(5, 12)
    np.testing.assert_allclose(client.predict("ln", x).output, keras_predict(model_files["layernorm_keras"], x),
                               atol=1e-5)


def test_versions_and_delete(client: Client, model_files, server) -> None:
    client.upload(model_files["seed_h5"], "m")
    client.upload(model_files["seed_h5"], "m")
    assert client.models() == {"m": [1, 2]}
    assert client.delete("m", 2) == [2]
    assert client.info("m").version == 1
    assert not (server.dataplane.repository.root / "m" / "2").exists()
    # numbers are never reused: the next upload is version 3
    assert client.upload(model_files["seed_h5"], "m").version == 3
    with pytest.raises(grpc.RpcError) as err:
        client.delete("m", 2)  # gone already
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.delete("m") == [1, 3]
    with pytest.raises(grpc.RpcError) as err:
        client.info("m")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_version_of_an_unloaded_model_can_be_deleted(client: Client, model_files, server) -> None:
    """DeleteModel of one version asked the registry, so an unloaded model's versions were NOT_FOUND while
    deleting all of them worked."""
    client.upload(model_files["seed_h5"], "m")
    client.upload(model_files["seed_h5"], "m")
    server.dataplane.unload_model("m")
    assert client.delete("m", 1) == [1]
    assert server.dataplane.repository.versions("m") == [2]
    with pytest.raises(grpc.RpcError) as err:
        client.delete("m", 7)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "version 7" in err.value.details()
    server.dataplane.load_model("m")
    assert client.models() == {"m": [2]}


def test_postprocessing(client: Client, model_files, keras_predict) -> None:
    client.upload(model_files["seed_h5"], "seed")
    x = _rows(9, 1000)
    ref = keras_predict(model_files["seed_h5"], x)
    probs = client.predict("seed", x, postprocess="probabilities").outputs["probabilities"]
    np.testing.assert_allclose(probs, ref, atol=1e-5)  # already softmax: passed through, not softmaxed twice
    argmax = client.predict("seed", x, postprocess="argmax").outputs["class"]
    np.testing.assert_array_equal(argmax, ref.argmax(1))
    top = client.predict("seed", x, postprocess="top_k", top_k=3).outputs
    np.testing.assert_array_equal(top["indices"], np.argsort(-ref, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(top["scores"], np.sort(ref, axis=1)[:, ::-1][:, :3], atol=1e-5)


def test_stream_answers_in_order_and_survives_a_bad_request(client: Client, model_files, keras_predict) -> None:
    client.upload(model_files["seed_h5"], "seed")
    batches = [_rows(4, 1000, seed=i) for i in range(20)]
    outs = list(client.stream("seed", batches))
    assert [o.request_id for o in outs] == [str(i) for i in range(20)]
    for x, o in zip(batches, outs):
        np.testing.assert_allclose(o.output, keras_predict(model_files["seed_h5"], x), atol=1e-5)
    mixed = [batches[0], _rows(2, 999), batches[1]]
    requests = [common.predict_request("seed", x, request_id=str(i)) for i, x in enumerate(mixed)]
    answers = list(client.inference_stub.PredictStream(iter(requests), timeout=120))
    assert [a.request_id for a in answers] == ["0", "1", "2"]  # the bad request is answered, and the stream went on
    assert answers[1].HasField("error") and not answers[1].outputs
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "got [2, 999]" in answers[1].error.message
    for i in (0, 2):
        assert not answers[i].HasField("error")
        np.testing.assert_allclose(codec.to_numpy(answers[i].outputs[0]),
                                   keras_predict(model_files["seed_h5"], mixed[i]), atol=1e-5)
    # the client hands the same answer over as a StreamError (or skips it when asked to)
    with pytest.raises(StreamError) as err:
        list(client.stream("seed", mixed))
    assert (err.value.code(), err.value.request_id) == (grpc.StatusCode.INVALID_ARGUMENT, "1")
    assert [o.request_id for o in client.stream("seed", mixed, raise_on_error=False)] == ["0", "2"]


def test_large_batches_through_both_encodings(client: Client, model_files, keras_predict) -> None:
    """The client sends large requests serialized with their bytes copied once (and aligned by ``padding``); the
    server computes on them where they arrived. Requests built as messages by any other client (here the stub
    with the runtime's own serializer) give the same answers."""
    client.upload(model_files["seed_h5"], "seed")
    x = _rows(300, 1000, seed=3)  # 1.2 MB
    expected = keras_predict(model_files["seed_h5"], x)
    np.testing.assert_allclose(client.predict("seed", x).output, expected, atol=1e-5)
    answer = client.inference_stub.Predict(common.predict_request("seed", x), timeout=120)
    np.testing.assert_allclose(codec.to_numpy(answer.outputs[0]), expected, atol=1e-5)
    outs = list(client.stream("seed", [x, x[:17], x]))
    for o, rows in zip(outs, (x, x[:17], x)):
        np.testing.assert_allclose(o.output, keras_predict(model_files["seed_h5"], rows), atol=1e-5)
    bad = common.predict_request("seed", x)
    bad.inputs[0].shape[:] = [301, 1000]
    with pytest.raises(grpc.RpcError) as err:
        client.inference_stub.Predict(bad, timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _own_format(path: Path, seed: int) -> tuple[Path, object]:
    rng = np.random.default_rng(seed)
    plan = build_plan((8,), [LayerSpec("h", rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=16).astype(
        np.float32), "tanh"), LayerSpec("o", rng.normal(size=(16, 4)).astype(np.float32), np.zeros(4, np.float32),
                                        "linear")])
    manifest, blob = artifacts.plan_to_files(plan)
    artifacts.write_zip(path, manifest, blob)
    return path, plan


@pytest.mark.slow
def test_new_version_swaps_in_while_predictions_run(client: Client, tmp_path: Path) -> None:
    """Uploading v2 (different weights) under 32 callers: every answer is exactly v1's or v2's (and the version it
    claims), zero failures; once the upload returned, every request sent afterwards gets v2."""
    path1, plan1 = _own_format(tmp_path / "v1.leanserve", 1)
    path2, plan2 = _own_format(tmp_path / "v2.leanserve", 2)
    x = _rows(2, 8)
    expected = {1: plan1.reference(x), 2: plan2.reference(x)}
    assert np.abs(expected[1] - expected[2]).min() > 1e-3  # every output tells the versions apart
    client.upload(path1, "hot")
    callers, after_swap = 32, 3
    errors: list[BaseException] = []
    seen: list[set[int]] = [set() for _ in range(callers)]
    warm = threading.Barrier(callers + 1)
    swapped = threading.Event()

    def caller(i: int) -> None:
        try:
            first, sent_after = True, 0
            while sent_after < after_swap:
                started_after_swap = swapped.is_set()
                out = client.predict("hot", x)
                np.testing.assert_allclose(out.output, expected[out.model_version], atol=1e-5, rtol=0)
                seen[i].add(out.model_version)
                if started_after_swap:
                    assert out.model_version == 2
                    sent_after += 1
                if first:  # answered before the upload began: by v1
                    first = False
                    warm.wait(120)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
            warm.abort()

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    try:
        warm.wait(120)  # every caller has had an answer from v1: the upload happens under load
        assert client.upload(path2, "hot").version == 2
        swapped.set()
    finally:
        swapped.set()
        for t in threads:
            t.join(300)
    assert not errors, errors[:3]
    assert all(s == {1, 2} for s in seen), seen


def test_tensorflow_runtime_model_is_served_again_after_a_restart(repo_dir: Path, model_files,
                                                                    keras_predict) -> None:
    x = _rows(5, 12)
    want = keras_predict(model_files["layernorm_keras"], x)
    for restart in (False, True):
        handle = create_server(make_settings(repo_dir))
        try:
            with Client(f"127.0.0.1:{handle.port}", timeout=120) as c:
                if not restart:
                    assert c.upload(model_files["layernorm_keras"], "ln").runtime == "tensorflow"
                info = c.info("ln")
                assert info.runtime == "tensorflow" and info.version == 1
                out = c.predict("ln", x)
                assert out.model_version == 1
                np.testing.assert_allclose(out.output, want, atol=1e-5)
        finally:
            handle.stop(0.5)
