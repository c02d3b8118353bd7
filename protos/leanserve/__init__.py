"""leanserve: a gRPC inference server with compiled sparse / int8 kernels, and its client.

``leanserve.client`` (always installed) calls a server; ``leanserve.server`` and ``leanserve.kernels`` need the
``leanserve[server]`` extra. ``leanserve.v1`` and ``leanserve.v2`` hold the generated protobuf / gRPC code of the
native API and of the Open Inference Protocol (proto package ``inference``, wire names unchanged).
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("leanserve")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0"
