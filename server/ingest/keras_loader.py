"""Load uploaded Keras models (``.keras`` zip or legacy HDF5 ``.h5``) safely.

Uploads are untrusted, so the file is inspected *before* Keras deserialises it: size, format (by content, not
name), the JSON model config (only built-in Keras classes, no Lambda, no serialized Python functions), the
layer count and the parameter count. Keras then loads it with ``safe_mode=True, compile=False``. No pickle is
involved anywhere. TensorFlow/Keras is imported lazily so the serving path never pays for it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from leanserve.server.errors import InvalidArgument, LeanserveError, ResourceExhausted, brief
from leanserve.server.ingest.archives import BoundedZip, expansion_limit
from leanserve.server.ingest.hdf5 import count_datasets, refuse_outside_data

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
_CONFIG = "config.json"
_WEIGHTS = "model.weights.h5"
#: the most bytes of JSON a model's config may take (.keras config.json, .h5 model_config): a real config of the
#: largest model allowed (max_model_layers) takes a few MiB at most, and parsing JSON takes many times its size
_MAX_CONFIG_BYTES = 4 * 1024 * 1024


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
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError):
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
    max_unpacked: int | None = None,
) -> "keras.Model":
    """Load an uploaded Keras model after checking it against the limits and the class allowlist.

    Raises ``ResourceExhausted`` when the file exceeds ``max_bytes`` or a ``.keras`` zip inflates (counted while
    inflating) past ``max_unpacked`` (default ``max_bytes``), and ``InvalidArgument`` for a corrupt file, a
    custom/Lambda/unknown class, or too many layers or parameters. The parameter count comes from the model's
    structure built without allocating any weight, so nothing is allocated before it is checked.
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
    unpacked = max_bytes if max_unpacked is None else max_unpacked
    config, (stored_params, stored_bytes) = _read_keras(path, unpacked) if fmt == "keras" else _read_h5(path)
    if stored_bytes > unpacked:  # e.g. datasets compressed inside the HDF5 file: Keras would read them whole
        raise ResourceExhausted(f"the model's stored weights take {stored_bytes} bytes, more than the {unpacked} a "
                                f"file of {size} bytes may expand to")
    with _untrusted("model config"):
        n_layers = check_config(config)
        if n_layers > max_layers:
            raise InvalidArgument(f"model has {n_layers} layers; the limit is {max_layers}")
        declared = max(stored_params, _estimate_params(config))
    if declared > max_params:
        raise InvalidArgument(f"model has about {declared} parameters; the limit is {max_params}")
    counted, weight_bytes = count_params_unallocated(config, fmt)
    if counted > max_params:
        raise InvalidArgument(f"model has {counted} parameters; the limit is {max_params}")
    if weight_bytes > unpacked:
        raise ResourceExhausted(f"model's weights would take {weight_bytes} bytes, more than the {unpacked} a file of "
                                f"{size} bytes may expand to")
    model = _keras_load(path, fmt)
    if model.count_params() > max_params:
        raise InvalidArgument(f"model has {model.count_params()} parameters; the limit is {max_params}")
    return model


def _read_keras(path: Path, max_unpacked: int) -> tuple[dict[str, Any], tuple[int, int]]:
    """The config of a ``.keras`` zip and the size of its stored weights. Every member is first inflated with a
    running count (declared sizes are not trusted) so that Keras later reads only what was counted; the weights
    go to a temporary file for h5py (seeking inside a compressed member would inflate it again and again)."""
    with tempfile.TemporaryDirectory(prefix="leanserve-keras-") as tmp, \
            BoundedZip(path, max_unpacked, "the .keras file") as zf:
        zf.check_all()
        if _CONFIG not in zf.names:
            raise InvalidArgument(f"not a valid Keras file: the archive holds no {_CONFIG}")
        raw = zf.read(_CONFIG, limit=_MAX_CONFIG_BYTES)
        stored = (0, 0)
        if _WEIGHTS in zf.names:
            weights = Path(tmp) / "weights.h5"
            zf.extract(_WEIGHTS, weights)
            with _untrusted(f"{_WEIGHTS} in the archive"):
                import h5py

                with h5py.File(weights, "r") as f:
                    refuse_outside_data(f)
                    stored = count_datasets(f)
    with _untrusted(_CONFIG):
        config = json.loads(raw)
    if not isinstance(config, dict):
        raise InvalidArgument(f"not a valid Keras file: {_CONFIG} is not a JSON object")
    return config, stored


def _read_h5(path: Path) -> tuple[dict[str, Any], tuple[int, int]]:
    with _untrusted("cannot read HDF5"):
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise InvalidArgument(
                    "not a valid Keras file: the HDF5 file holds no model config (a weights-only file?)"
                )
            raw = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")  # at most the file's own size
            if len(raw) > _MAX_CONFIG_BYTES:
                raise ResourceExhausted(f"the model config takes {len(raw)} bytes; the limit is {_MAX_CONFIG_BYTES}")
            config = json.loads(raw)
            refuse_outside_data(f)
            stored = count_datasets(f["model_weights"]) if "model_weights" in f else (0, 0)
    if not isinstance(config, dict):
        raise InvalidArgument("not a valid Keras file: model_config is not a JSON object")
    return config, stored


@contextlib.contextmanager
def _untrusted(what: str) -> Iterator[None]:
    """Turn whatever a parser raises on an uploaded file into ``InvalidArgument`` (``ResourceExhausted`` for memory).

    h5py, HDF5, zipfile and Keras raise RuntimeError, OSError, KeyError, ValueError, TypeError, RecursionError...
    on malformed input; a caught list always misses one, and any failure here is the file's, not the server's."""
    try:
        yield
    except LeanserveError:
        raise
    except MemoryError:
        raise ResourceExhausted(f"not a valid Keras file: {what}: more memory than is available") from None
    except Exception as exc:
        raise InvalidArgument(f"not a valid Keras file: {what}: {brief(exc, _ERROR_DETAIL_CHARS)}") from None


def count_params_unallocated(config: dict[str, Any], fmt: ModelFormat) -> tuple[int, int]:
    """The exact number of weights the model ``config`` describes and the bytes they would take, from the variables
    Keras creates when it builds the model inside a ``StatelessScope`` that defers every initialisation: shapes
    only, nothing allocated.

    Built in a thread of its own because Keras keeps the deferred variables in thread-local state, which must not
    outlive the count (a later scope on the same thread would initialise them)."""
    keras = import_keras()
    outcome: dict[str, Any] = {}

    def build() -> None:
        try:
            with keras.StatelessScope(initialize_variables=False):
                model = _instantiate(config, fmt)
                sizes = [(math.prod(int(d) for d in v.shape), _itemsize(v.dtype)) for v in model.weights]
                outcome["params"] = sum(n for n, _ in sizes)
                outcome["bytes"] = sum(n * itemsize for n, itemsize in sizes)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=build, name="leanserve-keras-count", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        with _untrusted("cannot build the model from its config"):
            raise outcome["error"]
    return int(outcome["params"]), int(outcome["bytes"])


def _itemsize(dtype: Any) -> int:
    import numpy as np

    try:
        return int(np.dtype(str(dtype)).itemsize)
    except TypeError:
        return 4


def settings_limits(path: Path, settings: Any) -> dict[str, int]:
    """``load_keras``'s limits from the server settings for the uploaded file ``path``."""
    return {
        "max_bytes": settings.max_upload_bytes,
        "max_params": settings.max_model_params,
        "max_layers": settings.max_model_layers,
        "max_unpacked": expansion_limit(Path(path).stat().st_size, settings.max_unpacked_bytes,
                                        settings.max_unpack_ratio),
    }


def _instantiate(config: dict[str, Any], fmt: ModelFormat) -> Any:
    # The same deserialisation Keras' own loaders run (saving_lib for .keras, legacy_h5_format for .h5), without
    # reading weights; safe mode on, no custom objects.
    from keras.src.saving.serialization_lib import ObjectSharingScope, SafeModeScope, deserialize_keras_object

    if fmt == "keras":
        with ObjectSharingScope():
            return deserialize_keras_object({**config, "compile_config": None}, None, safe_mode=True)
    from keras.src.legacy.saving import json_utils, saving_options, saving_utils

    with saving_options.keras_option_scope(use_legacy_config=True), SafeModeScope(True):
        return saving_utils.model_from_config(json_utils.decode(json.dumps(config)), custom_objects=None)


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
        except MemoryError:
            raise ResourceExhausted("not a valid Keras file: loading it needs more memory than is available") from None
        except Exception as exc:  # Keras, h5py and HDF5 raise many types on a malformed file: all are the file's
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
        return f"model uses a class that is not built into Keras: {brief(exc, _ERROR_DETAIL_CHARS)}"
    if "lambda" in lowered or "safe_mode" in lowered:
        return f"model holds Python code (Lambda), refused: {brief(exc, _ERROR_DETAIL_CHARS)}"
    return f"not a valid Keras file: {brief(exc, _ERROR_DETAIL_CHARS)}"

