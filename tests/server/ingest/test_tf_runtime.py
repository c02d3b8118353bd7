from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leanserve.server.ingest.keras_to_plan import keras_to_specs
from leanserve.server.errors import InvalidArgument, UnsupportedModel
from leanserve.server.runtime.tf_runtime import TFRuntime


@pytest.fixture
def layernorm_model(keras: Any) -> Any:
    L = keras.layers
    inp = keras.Input((6,), name="x")
    h = L.Dense(8, activation="gelu")(inp)
    h = L.LayerNormalization()(h)
    return keras.Model(inp, L.Dense(3, activation="softmax", name="probs")(h))


def test_serves_a_model_the_plan_cannot(layernorm_model: Any, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModel):
        keras_to_specs(layernorm_model)
    path = tmp_path / "ln.keras"
    layernorm_model.save(path)
    runtime = TFRuntime.from_path(path, max_bytes=1 << 20)
    runtime.warmup()
    assert runtime.signature["input"] == {"name": "x", "shape": [6], "dtype": "float32"}
    assert runtime.output_shape == [3]
    x = np.random.default_rng(0).standard_normal((7, 6)).astype(np.float32)
    want = np.asarray(layernorm_model(x, training=False))
    got = runtime(x)
    assert got.dtype == np.float32 and got.shape == (7, 3)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(runtime(x[:1]), want[:1], atol=1e-6, rtol=1e-5)


def test_concurrent_calls_agree(layernorm_model: Any) -> None:
    runtime = TFRuntime(layernorm_model)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((b, 6)).astype(np.float32) for b in (1, 2, 5, 9) * 4]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(runtime, batches))
    for x, y in zip(batches, results):
        np.testing.assert_allclose(y, np.asarray(layernorm_model(x, training=False)), atol=1e-6, rtol=1e-5)


def test_rejects_bad_inputs_and_multi_output(keras: Any, layernorm_model: Any) -> None:
    runtime = TFRuntime(layernorm_model)
    with pytest.raises(InvalidArgument, match="float32"):
        runtime(np.zeros((1, 6), dtype=np.float64))
    with pytest.raises(InvalidArgument, match="shape"):
        runtime(np.zeros((1, 5), dtype=np.float32))
    inp = keras.Input((4,))
    two = keras.Model(inp, [keras.layers.Dense(2)(inp), keras.layers.Dense(1)(inp)])
    with pytest.raises(UnsupportedModel):
        TFRuntime(two)


@pytest.mark.parametrize("dtype", ["uint8", "int32", "float64"])
def test_a_model_taking_other_than_float32_is_checked_in_its_own_dtype(keras: Any, tmp_path: Path,
                                                                      dtype: str) -> None:
    """The reference check feeds the model's own input dtype (it fed float32 to every model, so an upload of a
    model taking uint8 pixels or int32 indices was refused by its own runtime)."""
    from leanserve.server.ingest.build import check_reference, convert
    from leanserve.server.settings import Settings

    inp = keras.Input((4,), dtype=dtype, name="x")
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp))
    path = tmp_path / "m.keras"
    model.save(path)
    settings = Settings(repository=tmp_path / "repo", reference_samples=64)
    conv = convert("keras", path, settings)
    assert conv.input.dtype == dtype
    assert check_reference(conv, settings)["within_tolerance"]
    x = np.arange(8).reshape(2, 4).astype(dtype)
    np.testing.assert_allclose(conv.runner(x), np.asarray(model(x, training=False)), atol=1e-6, rtol=1e-5)


def test_reference_samples_stay_in_the_range_of_the_dtype() -> None:
    from leanserve.server.ingest.reference import sample_inputs

    rng = np.random.default_rng(0)
    for dtype, low, high in (("uint8", 0, 255), ("int8", -128, 127), ("int64", -128, 127), ("uint32", 0, 255)):
        x = sample_inputs(rng, (2000,), np.dtype(dtype))
        assert x.dtype == dtype and x.min() == low and x.max() == high
    assert sample_inputs(rng, (100,), np.dtype("bool")).dtype == bool
    f16 = sample_inputs(rng, (1000,), np.dtype("float16"))
    assert f16.dtype == np.float16 and -1.5 < float(f16.mean()) < 1.5 and f16.std() > 0.5


@pytest.fixture
def embedding_model(keras: Any) -> Any:
    """Integer ids into a 10-row embedding: ids 10 and up are values the model refuses."""
    L = keras.layers
    inp = keras.Input((3,), dtype="int32", name="ids")
    h = L.Flatten()(L.Embedding(10, 4)(inp))
    return keras.Model(inp, L.Dense(2, activation="softmax", name="probs")(h))


def test_values_the_model_refuses_are_invalid_argument(embedding_model: Any) -> None:
    runtime = TFRuntime(embedding_model)
    ok = np.array([[0, 9, 3]], np.int32)
    np.testing.assert_allclose(runtime(ok), np.asarray(embedding_model(ok, training=False)), atol=1e-6)
    with pytest.raises(InvalidArgument, match="cannot compute these input values") as err:
        runtime(np.array([[0, 10, 3]], np.int32))
    assert "\n" not in err.value.message  # the first line of TensorFlow's error, not its graph trace


def test_an_embedding_model_passes_the_reference_check_on_ids_it_accepts(embedding_model: Any, tmp_path: Path) -> None:
    """The check's random integers (up to 127) are outside a 10-row table: it samples ids 0 and 1 instead of
    failing the upload (it failed INTERNAL)."""
    from leanserve.server.ingest.build import check_reference, convert
    from leanserve.server.settings import Settings

    path = tmp_path / "emb.keras"
    embedding_model.save(path)
    settings = Settings(repository=str(tmp_path / "repo"))
    conv = convert("keras", path, settings)
    assert conv.runtime == "tensorflow"
    report = check_reference(conv, settings)
    assert report["within_tolerance"] and report["max_abs_error"] < 1e-5
