"""Upload over gRPC, predict, compare with Keras; restart on the same repository; versions and deletes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.app import create_server
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
    assert client.delete("m") == [1, 3]
    with pytest.raises(grpc.RpcError) as err:
        client.info("m")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


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
    outs = list(client.stream("seed", mixed, raise_on_error=False))
    assert [o.request_id for o in outs] == ["0", "2"]


def test_new_version_swaps_in_while_predictions_run(client: Client, model_files, keras_predict) -> None:
    """Uploading v2 under load: every call succeeds and is answered by v1 or v2, never by a half-loaded model."""
    client.upload(model_files["seed_h5"], "hot")
    x = _rows(2, 1000)
    expected = keras_predict(model_files["seed_h5"], x)
    errors: list[BaseException] = []
    versions: set[int] = set()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                out = client.predict("hot", x)
                versions.add(out.model_version)
                np.testing.assert_allclose(out.output, expected, atol=1e-5)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert client.upload(model_files["seed_h5"], "hot").version == 2
        deadline = time.monotonic() + 10
        while 2 not in versions and time.monotonic() < deadline:
            stop.wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:1]
    assert versions == {1, 2}
