"""Load uploaded Keras models (``.keras`` zip or legacy HDF5 ``.h5``) safely.

Uploads are untrusted, so the file is inspected *before* Keras deserialises it: size, format (by content, not
name), the JSON model config (only built-in Keras classes, no Lambda, no serialized Python functions), the
layer count and the parameter count. Keras then loads it with ``safe_mode=True, compile=False``. No pickle is
involved anywhere. TensorFlow/Keras is imported lazily so the serving path never pays for it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from leanserve.server.errors import InvalidArgument, ResourceExhausted

if TYPE_CHECKING:  # pragma: no cover
    import keras

ModelFormat = Literal["keras", "h5", "leanserve", "unknown"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
DEFAULT_MAX_LAYERS = 512
DEFAULT_MAX_PARAMS = 200_000_000

# Built-in layers that run arbitrary Python (Lambda) or load foreign graphs (TFSMLayer): never from an upload.
_REFUSED_CLASSES = frozenset({"Lambda", "TFSMLayer", "__lambda__"})
_ERROR_DETAIL_CHARS = 400


def import_keras() -> Any:
    """Import Keras (and TensorFlow) on first use, with TF's C++ log noise turned down."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def detect_format(path: Path) -> ModelFormat:
    """Classify a file by its content: ``keras`` zip, legacy ``h5``, ``leanserve`` zip (has manifest.json)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return "unknown"
    if head == HDF5_SIGNATURE:
        return "h5"
    if head[:4] in ZIP_MAGICS:
        try:
            with zipfile.ZipFile(path) as zf:
                names = set(zf.namelist())
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if "manifest.json" in names:
            return "leanserve"
        if "config.json" in names:
            return "keras"
    return "unknown"


def load_keras(
    path: Path,
    *,
    max_bytes: int,
    max_layers: int = DEFAULT_MAX_LAYERS,
    max_params: int = DEFAULT_MAX_PARAMS,
) -> "keras.Model":
    """Load an uploaded Keras model after checking it against the limits and the class allowlist.

    Raises ``ResourceExhausted`` when the file (or a zip's uncompressed content) exceeds ``max_bytes``, and
    ``InvalidArgument`` for a corrupt file, a custom/Lambda/unknown class, or too many layers or parameters.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"not a valid Keras file: {path.name!r} does not exist or is not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise ResourceExhausted(f"model file is {size} bytes; the limit is {max_bytes}")
    fmt = detect_format(path)
    if fmt == "leanserve":
        raise InvalidArgument("not a valid Keras file: this is a leanserve model archive (manifest.json)")
    if fmt == "unknown":
        raise InvalidArgument(
            "not a valid Keras file: neither a .keras zip archive nor an HDF5 .h5 file (truncated or corrupt?)"
        )
    config, stored_params = _read_keras(path, max_bytes) if fmt == "keras" else _read_h5(path)
    n_layers = check_config(config)
    if n_layers > max_layers:
        raise InvalidArgument(f"model has {n_layers} layers; the limit is {max_layers}")
    declared = max(stored_params, _estimate_params(config))
    if declared > max_params:
        raise InvalidArgument(f"model has about {declared} parameters; the limit is {max_params}")
    model = _keras_load(path, fmt)
    if model.count_params() > max_params:
        raise InvalidArgument(f"model has {model.count_params()} parameters; the limit is {max_params}")
    return model


def _read_keras(path: Path, max_bytes: int) -> tuple[dict[str, Any], int]:
    import h5py

    try:
        with zipfile.ZipFile(path) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
            if unpacked > max_bytes:
                raise ResourceExhausted(f"model archive unpacks to {unpacked} bytes; the limit is {max_bytes}")
            config = json.loads(zf.read("config.json"))
            params = 0
            if "model.weights.h5" in zf.namelist():
                with zf.open("model.weights.h5") as raw, h5py.File(raw, "r") as weights:
                    params = _count_datasets(weights)
    except ResourceExhausted:
        raise
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"not a valid Keras file: {_short(exc)}") from None
    if not isinstance(config, dict):
        raise InvalidArgument("not a valid Keras file: config.json is not a JSON object")
    return config, params


def _read_h5(path: Path) -> tuple[dict[str, Any], int]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise InvalidArgument(
                    "not a valid Keras file: the HDF5 file holds no model config (a weights-only file?)"
                )
            config = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
            params = _count_datasets(f["model_weights"]) if "model_weights" in f else 0
    except InvalidArgument:
        raise
    except (OSError, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"not a valid Keras file: cannot read HDF5 ({_short(exc)})") from None
    if not isinstance(config, dict):
        raise InvalidArgument("not a valid Keras file: model_config is not a JSON object")
    return config, params


def _count_datasets(group: Any) -> int:
    import h5py

    total = 0

    def visit(_name: str, obj: Any) -> None:
        nonlocal total
        if isinstance(obj, h5py.Dataset):
            total += int(obj.size)

    group.visititems(visit)
    return total


def check_config(config: dict[str, Any]) -> int:
    """Walk a Keras model config: refuse anything not built into Keras; return the number of layers.

    Built-in classes carry ``module`` ``keras``/``keras.*`` (or none in legacy .h5 configs) and no
    ``Package>Name`` registered name; serialized Python functions appear as non-string activations.
    """
    layers = 0

    def walk(node: Any, where: str) -> None:
        nonlocal layers
        if isinstance(node, list):
            for item in node:
                walk(item, where)
            return
        if not isinstance(node, dict):
            return
        cls = node.get("class_name")
        if isinstance(cls, str):
            name = _layer_name(node) or where
            module = node.get("module")
            registered = node.get("registered_name")
            if cls in _REFUSED_CLASSES:
                raise InvalidArgument(f"layer {name!r} is a {cls}: Python code in uploaded models is refused")
            custom = (
                ">" in cls
                or (isinstance(registered, str) and ">" in registered)
                or (module is not None and not (module == "keras" or str(module).startswith("keras.")))
                or (module is None and registered is not None)
            )
            if custom:
                raise InvalidArgument(
                    f"{name!r} uses custom class {registered or cls!r}: only built-in Keras classes are accepted"
                )
        for key in ("activation", "recurrent_activation"):
            value = node.get(key)
            if not (value is None or isinstance(value, str) or (isinstance(value, dict) and "class_name" in value)):
                raise InvalidArgument(
                    f"layer {_layer_name(node) or where!r} has a serialized Python function as {key}: "
                    "only named built-in activations are accepted"
                )
        sub = node.get("layers")
        if isinstance(sub, list):
            layers += sum(1 for item in sub if isinstance(item, dict) and "class_name" in item)
        for value in node.values():
            walk(value, _layer_name(node) or where)

    walk(config, "model")
    return layers


def _layer_name(node: dict[str, Any]) -> str | None:
    cfg = node.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
        return cfg["name"]
    return node.get("name") if isinstance(node.get("name"), str) else None


def _estimate_params(config: Any) -> int:
    """Parameters the config declares for Dense/Embedding layers, before Keras allocates them.

    A config can declare layers far larger than its weights file; Keras would allocate them while building.
    """
    total = 0
    if isinstance(config, list):
        return sum(_estimate_params(item) for item in config)
    if not isinstance(config, dict):
        return 0
    cfg = config.get("config")
    if isinstance(cfg, dict):
        units = cfg.get("units")
        build = config.get("build_config") or {}
        shape = build.get("input_shape") if isinstance(build, dict) else None
        if isinstance(units, int) and isinstance(shape, list) and shape and isinstance(shape[-1], int):
            total += (shape[-1] + 1) * units
        if isinstance(cfg.get("input_dim"), int) and isinstance(cfg.get("output_dim"), int):
            total += cfg["input_dim"] * cfg["output_dim"]
    for value in config.values():
        total += _estimate_params(value)
    return total


def _keras_load(path: Path, fmt: ModelFormat) -> "keras.Model":
    keras = import_keras()
    # Keras picks its loader from the file name; give it the suffix matching the content we detected.
    tmp = Path(tempfile.mkdtemp(prefix="leanserve-load-"))
    try:
        link = tmp / ("model.keras" if fmt == "keras" else "model.h5")
        try:
            os.symlink(path.resolve(), link)
        except OSError:
            shutil.copyfile(path, link)
        try:
            model = keras.saving.load_model(link, compile=False, safe_mode=True)
        except (ValueError, TypeError, KeyError, OSError, AttributeError, IndexError) as exc:
            raise InvalidArgument(_explain_load_error(exc)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not isinstance(model, keras.Model):
        raise InvalidArgument(f"not a valid Keras file: it holds a {type(model).__name__}, not a model")
    return model


def _explain_load_error(exc: BaseException) -> str:
    text = str(exc)
    lowered = text.lower()
    if "could not locate" in lowered or "unknown layer" in lowered or "custom_objects" in lowered:
        return f"model uses a class that is not built into Keras: {_short(exc)}"
    if "lambda" in lowered or "safe_mode" in lowered:
        return f"model holds Python code (Lambda), refused: {_short(exc)}"
    return f"not a valid Keras file: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _ERROR_DETAIL_CHARS else text[: _ERROR_DETAIL_CHARS - 3] + "..."
