"""Python client for leanserve: ``Client`` (blocking) and ``AsyncClient`` (asyncio)."""

from leanserve.client.client import Client, PredictOutput, StreamError
from leanserve.client.aio import AsyncClient

__all__ = ["Client", "AsyncClient", "PredictOutput", "StreamError"]
