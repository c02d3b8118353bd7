"""Python client for leanserve: ``Client`` (blocking) and ``AsyncClient`` (asyncio)."""

from client.client import Client, PredictOutput
from client.aio import AsyncClient

__all__ = ["Client", "AsyncClient", "PredictOutput"]
