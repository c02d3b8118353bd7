"""The one settings object. Read from ``LEANSERVE_*`` environment variables, overridden by CLI flags, then passed
to every constructor that needs it; nothing else in the server reads the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Server settings; every field can be set as ``LEANSERVE_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="LEANSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8500, ge=0, le=65535, description="Port to listen on; 0 picks a free one.")
    repository: Path = Field(Path("./models"), description="Folder holding the model repository.")

    worker_threads: int = Field(16, ge=1, description="gRPC worker threads (requests handled at once).")
    max_message_bytes: int = Field(
        512 * MIB, ge=4 * MIB, description="Largest gRPC message sent or received (gRPC's own default is 4 MiB)."
    )
    max_upload_bytes: int = Field(1024 * MIB, ge=1, description="Largest model file accepted by UploadModel.")
    max_model_params: int = Field(500_000_000, ge=1, description="Largest parameter count of an uploaded model.")
    max_model_layers: int = Field(512, ge=1, description="Largest layer count of an uploaded model.")
    max_batch_size: int = Field(8192, ge=1, description="Largest batch (rows) one predict request may carry.")

    reference_samples: int = Field(256, ge=1, description="Seeded random rows compared with the reference at upload.")
    reference_atol: float = Field(1e-4, ge=0, description="Absolute tolerance of the reference check.")
    reference_rtol: float = Field(1e-3, ge=0, description="Relative tolerance of the reference check.")

    autotune: bool = Field(True, description="Measure candidate kernel formats per layer at load and keep the fastest.")
    autotune_batch_sizes: tuple[int, ...] = Field((1, 32), description="Batch sizes the autotuner measures.")
    warmup_batch_sizes: tuple[int, ...] = Field((1, 8, 64), description="Batch sizes compiled/warmed at model load.")

    shutdown_grace_seconds: float = Field(5.0, ge=0, description="Time in-flight RPCs get to finish on SIGTERM.")
    log_level: str = Field("INFO", description="Python logging level.")
