from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leanserve.server.ingest.keras_loader import detect_format, load_keras
from leanserve.server.ingest.keras_to_plan import keras_to_specs
from leanserve.server.errors import InvalidArgument, ResourceExhausted
from leanserve.server.runtime.plan import build_plan

MB = 1 << 20


@pytest.fixture
def small_model(keras: Any, randomize_batchnorm: Any) -> Any:
    L = keras.layers
    model = keras.Sequential(
        [keras.Input((8, 8)), L.Flatten(), L.Dense(12), L.BatchNormalization(), L.ReLU(), L.Dropout(0.1),
         L.Dense(10, activation="softmax")]
    )
    randomize_batchnorm(model, np.random.default_rng(3))
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_round_trip_load_and_convert(small_model: Any, tmp_path: Path, suffix: str) -> None:
    saved = tmp_path / f"model{suffix}"
    small_model.save(saved)
    # Format comes from the content, not the name.
    upload = tmp_path / "upload.bin"
    shutil.copyfile(saved, upload)
    assert detect_format(upload) == suffix.lstrip(".")

    loaded = load_keras(upload, max_bytes=MB)
    shape, specs = keras_to_specs(loaded)
    assert shape == (8, 8)
    x = np.random.default_rng(0).standard_normal((5, 8, 8)).astype(np.float32)
    want = np.asarray(small_model(x, training=False))
    np.testing.assert_allclose(build_plan(shape, specs)(x), want, atol=1e-5, rtol=1e-5)


def test_detect_format_leanserve_and_unknown(tmp_path: Path) -> None:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("manifest.json", "{}")
    assert detect_format(archive) == "leanserve"
    text = tmp_path / "m.keras"
    text.write_text("hello")
    assert detect_format(text) == "unknown"
    with pytest.raises(InvalidArgument, match="leanserve"):
        load_keras(archive, max_bytes=MB)


def test_lambda_layer_is_refused_in_both_formats(keras: Any, tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t * 2), keras.layers.Dense(2)])
    for suffix in (".keras", ".h5"):
        path = tmp_path / f"lambda{suffix}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns that a lambda is unsafe to serialize
            model.save(path)
        with pytest.raises(InvalidArgument, match="Lambda"):
            load_keras(path, max_bytes=MB)


def test_custom_class_and_python_activation_are_refused(keras: Any, tmp_path: Path) -> None:
    @keras.saving.register_keras_serializable(package="uploader")
    class Doubler(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return x * 2

    model = keras.Sequential([keras.Input((3,)), Doubler(), keras.layers.Dense(2)])
    for suffix in (".keras", ".h5"):
        path = tmp_path / f"custom{suffix}"
        model.save(path)
        # Refused even though this process has the class registered: uploads may only use built-ins.
        with pytest.raises(InvalidArgument, match="custom class"):
            load_keras(path, max_bytes=MB)

    def double(x: Any) -> Any:
        return x * 2

    fn_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation=double)])
    path = tmp_path / "fn.keras"
    fn_model.save(path)
    with pytest.raises(InvalidArgument, match="custom class|Python function"):
        load_keras(path, max_bytes=MB)


def test_unknown_class_in_config_is_refused(small_model: Any, tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    small_model.save(path)
    forged = tmp_path / "forged.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"][2]["class_name"] = "TotallyNotADense"
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    with pytest.raises(InvalidArgument, match="not built into Keras|TotallyNotADense"):
        load_keras(forged, max_bytes=MB)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_truncated_or_garbage_file_is_invalid(small_model: Any, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"m{suffix}"
    small_model.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArgument, match="not a valid Keras file"):
        load_keras(path, max_bytes=MB)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(InvalidArgument, match="not a valid Keras file"):
        load_keras(path, max_bytes=MB)


def test_size_layer_and_parameter_limits(small_model: Any, tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    small_model.save(path)
    size = path.stat().st_size
    with pytest.raises(ResourceExhausted):
        load_keras(path, max_bytes=size - 1)
    assert load_keras(path, max_bytes=size) is not None
    with pytest.raises(InvalidArgument, match="layers"):
        load_keras(path, max_bytes=MB, max_layers=3)
    n_params = small_model.count_params()
    with pytest.raises(InvalidArgument, match="parameters"):
        load_keras(path, max_bytes=MB, max_params=n_params - 1)
    assert load_keras(path, max_bytes=MB, max_params=n_params).count_params() == n_params


def test_zip_bomb_is_refused_before_unpacking(tmp_path: Path) -> None:
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"\x00" * (4 * MB))
    assert path.stat().st_size < MB
    with pytest.raises(ResourceExhausted, match="unpacks"):
        load_keras(path, max_bytes=MB)


def test_config_declaring_huge_layers_is_refused_before_building(small_model: Any, tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    small_model.save(path)
    forged = tmp_path / "huge.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(forged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                dense = config["config"]["layers"][2]
                dense["config"]["units"] = 1_000_000
                dense["build_config"]["input_shape"] = [None, 1_000_000]
                data = json.dumps(config).encode()
            dst.writestr(info, data)
    with pytest.raises(InvalidArgument, match="parameters"):
        load_keras(forged, max_bytes=MB)
