"""Serve a Keras model the Plan cannot express, through one traced ``tf.function``.

TensorFlow is imported only when a ``TFRuntime`` is built, so a server that serves Plans never loads it. The
function is traced once at construction (batch dim ``None``) and the concrete function is called directly, so
requests never retrace and calls from many threads are safe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from leanserve.server.errors import InvalidArgument, brief


class TFRuntime:
    """A thread-safe ``x -> y`` callable over a single-input, single-output Keras model."""

    def __init__(self, model: Any) -> None:
        from leanserve.server.ingest.keras_loader import import_keras
        from leanserve.server.ingest.keras_to_plan import model_signature
        from leanserve.server.errors import UnsupportedModel

        import_keras()
        import tensorflow as tf

        self.signature = model_signature(model)  # refuses multi-input / multi-output models
        shape = self.signature["input"]["shape"]
        if any(d is None for d in shape):
            raise UnsupportedModel(f"input shape {shape} must be fully defined (apart from the batch dim)")
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in shape)
        self.input_dtype = np.dtype(self.signature["input"]["dtype"])
        self.model = model
        spec = tf.TensorSpec([None, *self.input_shape], tf.as_dtype(self.input_dtype), name="x")

        def forward(x: Any) -> Any:
            return model(x, training=False)

        self._tf = tf
        self._fn = tf.function(forward, input_signature=[spec]).get_concrete_function()

    @classmethod
    def from_path(cls, path: Path, *, max_bytes: int, **limits: int) -> "TFRuntime":
        """Load an uploaded ``.keras``/``.h5`` file through the checked loader and wrap it."""
        from leanserve.server.ingest.keras_loader import load_keras

        return cls(load_keras(path, max_bytes=max_bytes, **limits))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Run ``x[B, *input_shape]`` (the model's input dtype) and return the output as numpy. InvalidArgument when
        the model refuses the values (TensorFlow's InvalidArgumentError, e.g. an index out of an embedding's range)."""
        if not isinstance(x, np.ndarray) or x.dtype != self.input_dtype:
            got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
            raise InvalidArgument(f"expected a {self.input_dtype} array, got {got}")
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape or x.shape[0] < 1:
            raise InvalidArgument(f"expected input of shape [B, {', '.join(map(str, self.input_shape))}], "
                                  f"got {list(x.shape)}")
        try:
            out = self._fn(self._tf.constant(x))
        except self._tf.errors.InvalidArgumentError as exc:
            # the values, not the server: e.g. an index outside an embedding's table
            raise InvalidArgument("the model cannot compute these input values: "
                                  f"{brief(exc, first_line=True)}") from None
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out)

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run each batch size once so the first request pays no graph/kernel initialisation."""
        for batch in batch_sizes:
            self(np.zeros((batch, *self.input_shape), dtype=self.input_dtype))

    @property
    def output_shape(self) -> list[Any]:
        return list(self.signature["output"]["shape"])
