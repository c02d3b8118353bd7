"""Attacks on Keras uploads (.keras zip, legacy .h5) through a real server: each ends with its status code, nothing
runs or is stored, and the server keeps serving."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.app import ServerHandle, create_server
from tests.conftest import make_settings
from tests.fuzz import hostile

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def models(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keras-models")
    small = keras.Sequential([keras.Input((8,), name="x"), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    small.save(d / "small.h5")
    small.save(d / "small.keras")
    words = keras.Input((1,), dtype="string", name="words")
    ids = keras.layers.StringLookup(vocabulary=["a", "b"])(words)
    keras.Model(words, keras.layers.CategoryEncoding(num_tokens=3, output_mode="one_hot")(ids)).save(d / "str.keras")
    return {"h5": d / "small.h5", "keras": d / "small.keras", "string": d / "str.keras"}


@pytest.fixture(scope="module")
def served(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Path]]:
    root = tmp_path_factory.mktemp("hostile-keras")
    handle: ServerHandle = create_server(make_settings(root / "models", autotune=False, reference_samples=16))
    with Client(f"127.0.0.1:{handle.port}", timeout=120) as client:
        client.upload(models["h5"], "good")
        yield client, root
    handle.stop(0.5)


def _alive(client: Client) -> None:
    assert client.predict("good", np.ones((2, 8), np.float32)).outputs
    assert client.models() == {"good": [1]}


def _with_config(source: Path, change: Any) -> bytes:
    """``source`` (a .keras zip) with its config.json rewritten by ``change(config)``."""
    with zipfile.ZipFile(source) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    config = json.loads(members["config.json"])
    change(config)
    members["config.json"] = json.dumps(config).encode()
    return hostile.zip_of(members)


def test_string_input_is_invalid_argument(served, models: dict[str, Path]) -> None:
    """Finding: a string-dtype Keras input was INTERNAL."""
    client, _ = served
    assert hostile.upload_code(client, models["string"].read_bytes()) == INVALID
    _alive(client)


def test_layers_declared_larger_than_their_weights_are_counted_before_allocation(served,
                                                                                   models: dict[str, Path]) -> None:
    """Finding: the parameter estimate ignored layers without build_config, so Keras allocated before the count
    was checked. The count now comes from the model built without allocating."""
    client, _ = served

    def huge(config: dict[str, Any]) -> None:
        for layer in config["config"]["layers"]:
            layer.pop("build_config", None)
        config["config"]["layers"][1]["config"]["units"] = 2_000_000_000  # 8 * 2e9 params, would be 64 GB
    assert hostile.upload_code(client, _with_config(models["keras"], huge)) == INVALID

    def wide(config: dict[str, Any]) -> None:  # under max_model_params, far more than this small file carries
        for layer in config["config"]["layers"]:
            layer.pop("build_config", None)
        config["config"]["layers"][1]["config"]["units"] = 20_000_000
    assert hostile.upload_code(client, _with_config(models["keras"], wide)) == EXHAUSTED
    _alive(client)


def test_keras_archive_bombs(served, models: dict[str, Path]) -> None:
    client, _ = served
    with zipfile.ZipFile(models["keras"]) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    bomb = hostile.bomb_zip({**members, "assets/padding.bin": 512 << 20})
    assert len(bomb) < 1 << 20
    assert hostile.upload_code(client, bomb) == EXHAUSTED
    weights_bomb = hostile.bomb_zip({**members, "model.weights.h5": 512 << 20})
    assert hostile.upload_code(client, weights_bomb) == EXHAUSTED
    assert hostile.upload_code(client, hostile.declare_size(bomb, "assets/padding.bin", 10)) == INVALID
    assert hostile.upload_code(client, hostile.bomb_zip({"config.json": 64 << 20})) in (INVALID, EXHAUSTED)
    _alive(client)


def test_h5_datasets_larger_than_the_file(served, models: dict[str, Path], tmp_path: Path) -> None:
    """An HDF5 dataset can declare a shape whose chunks are never written (or are compressed): reading it would
    allocate the declared size. Its size is counted from shapes and refused before Keras reads anything."""
    import h5py

    client, _ = served
    path = tmp_path / "hollow.h5"
    path.write_bytes(models["h5"].read_bytes())
    with h5py.File(path, "r+") as f:
        f["model_weights"].create_dataset("hollow", shape=(100_000_000,), dtype="f4", chunks=(1 << 20,),
                                          compression="gzip")
    assert path.stat().st_size < 1 << 20
    assert hostile.upload_code(client, path.read_bytes()) == EXHAUSTED
    _alive(client)


def test_h5_byte_mutants(served, models: dict[str, Path]) -> None:
    """Finding: 75 of 240 byte-mutants of a saved .h5 were INTERNAL (h5py RuntimeError/OSError/KeyError/ValueError).
    Through the server a sample of mutants ends OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED (the in-process fuzzer in
    tests/fuzz covers many more)."""
    client, _ = served
    good = models["h5"].read_bytes()
    rng = np.random.default_rng(0)
    codes = []
    for _ in range(24):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[pos] = int(rng.integers(0, 256))
        code = hostile.upload_code(client, bytes(data), "mutant")
        codes.append(code)
        assert code in (grpc.StatusCode.OK, INVALID, EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION), code
        if code == grpc.StatusCode.OK:
            client.delete("mutant")
    assert INVALID in codes
    _alive(client)


def test_python_code_in_a_model_never_runs(served, keras: Any, tmp_path: Path) -> None:
    """What held: Lambda (marshal'd bytecode) and custom classes in .keras and .h5 are refused, never executed."""
    client, _ = served
    flag = tmp_path / "executed"
    probe = f"open({str(flag)!r}, 'w').close()"
    lam = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: (exec(probe), x)[1]),
                            keras.layers.Dense(2)])
    flag.unlink(missing_ok=True)  # building the model above ran the lambda once, here in the test
    for suffix in (".keras", ".h5"):
        lam.save(tmp_path / f"lam{suffix}")
        assert hostile.upload_code(client, (tmp_path / f"lam{suffix}").read_bytes()) == INVALID
        assert not flag.exists()

    plain = tmp_path / "plain.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)]).save(plain)

    def custom(config: dict[str, Any]) -> None:
        config["config"]["layers"][1].update({"module": "os", "class_name": "system", "registered_name": "os>system"})
    assert hostile.upload_code(client, _with_config(plain, custom)) == INVALID
    _alive(client)


def test_an_h5_model_config_past_the_limit_is_refused_before_it_is_parsed(served, models: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """Finding: a 40 MiB .h5 whose model_config was padded with ``{}`` objects took 2.8 GB to parse (JSON objects
    take many times their text); .keras capped its config.json, .h5 did not."""
    import h5py

    client, _ = served
    path = tmp_path / "padded.h5"
    path.write_bytes(models["h5"].read_bytes())
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        config["padding"] = [{}] * (2 << 20)  # 6 MiB of text
        f.attrs["model_config"] = json.dumps(config)
    assert hostile.upload_code(client, path.read_bytes()) == EXHAUSTED
    _alive(client)


def test_models_tensorflow_cannot_run_or_softmax_over_another_axis(served, keras: Any, tmp_path: Path) -> None:
    """Findings: ``Softmax(axis=7)`` on a rank-2 output was INTERNAL at upload (tracing raised); a softmax over the
    batch axis was taken for probabilities, so PROBABILITIES answered rows that do not sum to 1."""
    client, _ = served
    L = keras.layers
    inp = keras.Input((8,), name="x")
    keras.Model(inp, L.Softmax(axis=7)(inp)).save(tmp_path / "axis7.keras")
    assert hostile.upload_code(client, (tmp_path / "axis7.keras").read_bytes()) == INVALID
    inp = keras.Input((8,), name="x")
    batch_axis = keras.Model(inp, L.Softmax(axis=0)(L.Dense(5)(inp)))
    batch_axis.save(tmp_path / "axis0.keras")
    client.upload(tmp_path / "axis0.keras", "axis0")
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    probs = client.predict("axis0", x, postprocess="probabilities").outputs["probabilities"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    raw = np.asarray(batch_axis(x, training=False))
    np.testing.assert_allclose(probs, np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)
    client.delete("axis0")
    _alive(client)


def _repeat_model(keras: Any, path: Path, copies: int) -> Path:
    """0 parameters, a few KB: each input row becomes ``copies`` floats inside, averaged back to one."""
    L = keras.layers
    inp = keras.Input((1,), name="x")
    keras.Model(inp, L.GlobalAveragePooling1D()(L.RepeatVector(copies)(inp))).save(path)
    return path


def test_a_model_whose_rows_take_gigabytes_inside_is_refused_before_it_runs(served, keras: Any,
                                                                              tmp_path: Path) -> None:
    """Finding: a 15 KB model (RepeatVector(10**6) then a pooling) took 1.2 GB at upload and more with each
    predict; nothing bounded a model's intermediate results. A row of 4 GB of them is refused at once."""
    client, _ = served
    bomb = _repeat_model(keras, tmp_path / "bomb.keras", 10**9)
    assert bomb.stat().st_size < 1 << 20
    assert hostile.upload_code(client, bomb.read_bytes()) == EXHAUSTED
    _alive(client)


def test_a_large_working_memory_caps_the_rows_of_a_call(keras: Any, tmp_path: Path) -> None:
    """Under max_activation_bytes, a model whose row takes 4 MB inside serves at most 16 rows per call at 64 MiB:
    a larger request is INVALID_ARGUMENT, concurrent ones are batched up to the cap, never past it."""
    from concurrent.futures import ThreadPoolExecutor

    handle = create_server(make_settings(tmp_path / "models", autotune=False, reference_samples=40,
                                         max_activation_bytes=64 << 20))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=120) as client:
            client.upload(_repeat_model(keras, tmp_path / "wide.keras", 10**6), "wide")
            assert client.info("wide").max_batch_size == 16  # what a client can size its requests by
            x = np.arange(16, dtype=np.float32).reshape(16, 1)
            np.testing.assert_allclose(client.predict("wide", x).output, x, rtol=1e-6)
            with pytest.raises(grpc.RpcError) as err:
                client.predict("wide", np.ones((17, 1), np.float32))
            assert err.value.code() == INVALID and "1..16" in err.value.details()
            with ThreadPoolExecutor(8) as pool:
                outs = list(pool.map(lambda i: client.predict("wide", np.full((5, 1), i, np.float32)).output,
                                     range(24)))
            assert all(np.allclose(o, i) for i, o in enumerate(outs))
        batches = handle.dataplane.registry.get("wide", None).stats.snapshot().batches
        assert max(batches) <= 16, batches
    finally:
        handle.stop(0.5)


def test_h5_data_kept_outside_the_file_is_refused(served, models: dict[str, Path], tmp_path: Path) -> None:
    """A dataset with HDF5 external storage, or an external link, would make the server read one of its own files
    into the weights (and predictions would leak it): refused by leanserve itself, whatever Keras' version does."""
    import h5py

    client, _ = served
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"server-side secret".ljust(128, b"."))
    cases = {}
    for kind in ("external_storage", "external_link"):
        path = tmp_path / f"{kind}.h5"
        path.write_bytes(models["h5"].read_bytes())
        with h5py.File(path, "r+") as f:
            if kind == "external_storage":
                f["model_weights"].create_dataset("leak", shape=(32,), dtype="<f4", external=[(str(secret), 0, 128)])
            else:
                f["model_weights"]["leak"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/data")
        cases[kind] = path
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = np.zeros(32, np.float32)
    for kind, message in (("external_storage", "keeps its data outside the file"),
                          ("external_link", "points into another file")):
        with pytest.raises(grpc.RpcError) as err:
            client.upload(cases[kind], "leak")
        assert err.value.code() == INVALID and message in err.value.details(), err.value.details()
    _alive(client)
