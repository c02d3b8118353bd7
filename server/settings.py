"""The one settings object. Read from ``LEANSERVE_*`` environment variables, overridden by CLI flags, then passed
to every constructor that needs it; nothing else in the server reads the environment."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Union

from pydantic import BaseModel, BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


def _repository_location(value: object) -> object:
    """``s3://...`` stays a string; anything else is a local folder (a Path)."""
    if isinstance(value, str) and not value.startswith("s3://"):
        return Path(value)
    return value


#: a local folder (Path) or an ``s3://BUCKET/PREFIX`` URI (str)
RepositoryLocation = Annotated[Union[Path, str], BeforeValidator(_repository_location)]


def _bare_host(value: object) -> object:
    """``[::1]`` (as written in an address) and ``::1`` name the same host: kept without brackets."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        return value[1:-1]
    return value


def _log_level(value: object) -> object:
    if isinstance(value, str):
        if not isinstance(logging.getLevelName(value.upper()), int):
            raise ValueError(f"unknown log level {value!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value.upper()
    return value


def listen_address(host: str, port: int) -> str:
    """``host:port`` as gRPC and people write it (``[::1]:8500`` for an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BatchOverride(BaseModel):
    """Per-model batching settings; a field left unset keeps the server-wide value."""

    enabled: bool | None = Field(None, description="Batch this model's requests (False = run each request alone).")
    max_batch_size: int | None = Field(None, ge=1, description="Most rows per kernel call.")
    max_queue_delay_us: int | None = Field(None, ge=0, description="Longest wait for more rows when busy (µs).")
    max_queue_size: int | None = Field(None, ge=1, description="Most queued requests before RESOURCE_EXHAUSTED.")
    workers: int | None = Field(None, ge=1, description="Batches of this model executing at once.")
    inline_below_us: int | None = Field(None, ge=0, description="See Settings.batch_inline_below_us.")


class Settings(BaseSettings):
    """Server settings; every field can be set as ``LEANSERVE_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="LEANSERVE_", extra="ignore")

    host: Annotated[str, BeforeValidator(_bare_host)] = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8500, ge=0, le=65535, description="Port to listen on; 0 picks a free one.")
    repository: RepositoryLocation = Field(
        Path("./models"), description="The model repository: a folder, or s3://BUCKET/PREFIX (endpoint, credentials "
        "and region as boto3 finds them: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_DEFAULT_REGION, AWS_PROFILE, ~/.aws).",
    )
    repository_cache_dir: Path | None = Field(
        None, description="Local folder for the versions a server downloads from an s3:// repository (kept across "
        "restarts, checked by SHA-256), and its audit log. Default: ~/.cache/leanserve/s3/BUCKET/PREFIX.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO, rclone, ...) for an s3:// repository; unset = "
        "whatever boto3 finds (AWS_ENDPOINT_URL, the profile, else AWS itself).",
    )

    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the gRPC port (and of the metrics endpoint); with tls_key_file "
        "the port speaks TLS only. Re-read when the file changes or on SIGHUP, for new connections.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA certificate(s): clients must present a certificate signed by one (mTLS); its "
        "common name is who the audit log names when no token is sent. Needs tls_cert_file.",
    )
    auth_tokens_file: Path | None = Field(
        None, description="Token file: one '<role> <sha256 hex of the token> [label]' per line ('#' comments), "
        "roles 'admin' (everything) and 'infer' (predict and read model metadata). Clients send the metadata "
        "'authorization: Bearer <token>'. Re-read when it changes. Health checks and ServerLive/ServerReady stay "
        "open. Unset = no authentication.",
    )
    reflection: bool | None = Field(
        None, description="Serve gRPC reflection (lets grpcurl list the services). Default: on, off when "
        "auth_tokens_file is set.",
    )
    insecure: bool = Field(
        False, description="Allow listening on a non-loopback host with neither TLS nor tokens (anyone who reaches "
        "the port may then upload, delete and predict). Without it such a server refuses to start.",
    )
    client_error_log_per_second: int = Field(
        10, ge=1, description="Log lines per second and status code for client mistakes (bad requests, refused "
        "tokens); more are counted and dropped.",
    )

    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Server processes sharing the port (SO_REUSEPORT; the kernel spreads connections over them). "
        "Python's GIL holds one process near one core of request handling; N processes use up to N cores. Each "
        "loads the repository and follows the others' uploads, deletes, pins and unloads by polling it.",
    )
    repository_poll_seconds: float | None = Field(
        None,
        ge=0,
        description="How often to re-read the repository and serve what other processes (or people) changed in it; "
        "0 = never. Default: 1 s when processes > 1 or the repository is s3://, else never.",
    )
    process_index: int = Field(
        0, ge=0, description="Set by the first process for the extra ones it starts (1, 2, ...); not for users."
    )

    worker_threads: int = Field(
        2,
        ge=1,
        description="gRPC threads running unary calls (Predict, ModelInfer, metadata, admin calls) at once. Few serve "
        "best: each runnable thread competes for the GIL, and every hand-off costs context switches (on 2 cores, 2 "
        "threads served 10-20 % more small-model requests than 4, and so did the bare grpcio floor). A call waiting "
        "for a busy batcher does not count (another thread takes the next call, up to max_worker_threads), so "
        "models still batch every concurrent caller. Streaming calls have their own pool.",
    )
    max_worker_threads: int = Field(
        64,
        ge=1,
        description="Most unary threads in all, counting calls waiting for a batch: about the largest batch "
        "concurrent unary callers can form (at least worker_threads).",
    )
    max_open_streams: int = Field(
        96,
        ge=1,
        description="Predict streams (PredictStream, ModelStreamInfer) open at once; more are refused with "
        "RESOURCE_EXHAUSTED. Each holds a thread of the stream pool for its life, never a unary thread.",
    )
    max_open_uploads: int = Field(
        8,
        ge=1,
        description="UploadModel calls open at once (each holds a stream-pool thread while it receives); more are "
        "refused with RESOURCE_EXHAUSTED.",
    )
    max_open_optimizations: int = Field(
        2,
        ge=1,
        description="Optimize calls open at once (receiving data or following a job); more are refused with "
        "RESOURCE_EXHAUSTED. Which of them may run a job is optimize_max_jobs.",
    )
    max_open_reflection_streams: int = Field(
        4,
        ge=1,
        description="Server reflection streams (grpcurl and the like) open at once; more are refused with "
        "RESOURCE_EXHAUSTED. Each holds a stream-pool thread while open, and ends after "
        "stream_idle_timeout_seconds without a request.",
    )
    max_health_watches: int = Field(
        1024,
        ge=1,
        description="grpc.health.v1 Watch calls open at once (open to callers without a token; each holds no "
        "thread, only its call); more are refused with RESOURCE_EXHAUSTED.",
    )
    stream_idle_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest wait for the next message of a client stream (UploadModel, Optimize, PredictStream, "
        "ModelStreamInfer) while the server has nothing of it in hand; then the call ends with DEADLINE_EXCEEDED "
        "and its slot is free again. Also the longest a streamed response may wait to be sent (a client that "
        "stopped reading): then the call is cancelled.",
    )
    upload_min_bytes_per_second: int = Field(
        16 * 1024,
        ge=0,
        description="Slowest average rate an upload (or an optimization's data) may arrive at, counted from its "
        "first message once stream_idle_timeout_seconds have passed; a slower one ends with DEADLINE_EXCEEDED and "
        "frees its slot, so a few trickling clients cannot hold every upload slot. 0 = no minimum.",
    )
    max_models: int = Field(
        1000, ge=1, description="Most models the repository may hold; an upload of a new model past it is refused "
        "with RESOURCE_EXHAUSTED."
    )
    max_versions_per_model: int = Field(
        100, ge=1, description="Most stored versions of one model; an upload or optimization past it is refused "
        "with RESOURCE_EXHAUSTED (delete old versions first)."
    )
    max_repository_bytes: int = Field(
        64 * 1024 * MIB, ge=1, description="Most bytes the repository's versions may take on disk; an upload or "
        "optimization that would pass it is refused with RESOURCE_EXHAUSTED."
    )
    max_message_bytes: int = Field(
        512 * MIB, ge=4 * MIB, description="Largest gRPC message sent or received (gRPC's own default is 4 MiB)."
    )
    max_upload_bytes: int = Field(1024 * MIB, ge=1, description="Largest model file accepted by UploadModel.")
    max_unpacked_bytes: int = Field(
        1024 * MIB,
        ge=1,
        description="Most bytes an uploaded archive (.keras or .leanserve zip) may inflate to, counted while inflating "
        "(the sizes its directory declares are not trusted); past it the upload is refused with RESOURCE_EXHAUSTED.",
    )
    max_unpack_ratio: float = Field(
        2.0,
        ge=1,
        description="Most bytes an uploaded model may expand to per byte received (with a 16 MiB floor, and never "
        "past max_unpacked_bytes): what its archive inflates to, and the memory its Keras weights take. Keras and "
        "leanserve write archives uncompressed (ratio ~1), so a higher ratio only serves re-compressed files.",
    )
    max_model_params: int = Field(500_000_000, ge=1, description="Largest parameter count of an uploaded model.")
    max_model_layers: int = Field(512, ge=1, description="Largest layer count of an uploaded model.")
    max_batch_size: int = Field(8192, ge=1, description="Largest batch (rows) one predict request may carry.")
    max_activation_bytes: int = Field(
        1024 * MIB,
        ge=1,
        description="Most bytes of intermediate results one model call may produce: the sum of every layer's "
        "output for the call's rows. A model whose single row needs more is refused at upload "
        "(RESOURCE_EXHAUSTED); for the others it caps the rows of a kernel call and of a request (a larger request "
        "is INVALID_ARGUMENT), so no file or request makes the server allocate without bound.",
    )

    reference_samples: int = Field(256, ge=1, description="Seeded random rows compared with the reference at upload.")
    reference_atol: float = Field(1e-4, ge=0, description="Absolute tolerance of the reference check.")
    reference_rtol: float = Field(1e-3, ge=0, description="Relative tolerance of the reference check.")

    autotune: bool = Field(True, description="Measure candidate kernel formats per layer at load and keep the fastest.")
    autotune_batch_sizes: tuple[int, ...] = Field((1, 8, 32), description="Batch sizes the autotuner measures.")
    blas_threads: int = Field(
        1, ge=1, description="Threads BLAS may use per GEMM call (layers the tuner put on GEMM for larger batches); "
        "requests already run in parallel, so more threads than 1 oversubscribe the cores.")
    malloc_trim_threshold_bytes: int = Field(
        32 * 1024 * 1024, ge=0, description="glibc malloc: free memory an arena keeps instead of returning it to the "
        "kernel (0 = glibc's default); large messages then reuse memory instead of page-faulting it in again.")
    malloc_mmap_threshold_bytes: int = Field(
        4 * 1024 * 1024, ge=0, le=32 * 1024 * 1024, description="glibc malloc: blocks at least this large are mapped "
        "apart and unmapped when freed (0 = glibc's default, which starts at 128 KiB).")
    warmup_batch_sizes: tuple[int, ...] = Field((1, 8, 64), description="Batch sizes compiled/warmed at model load.")

    batching: bool = Field(
        True, description="Dynamic batching: concurrent requests to one model version run as one kernel call."
    )
    batch_max_size: int = Field(64, ge=1, description="Most rows the batcher puts into one kernel call.")
    batch_max_queue_delay_us: int = Field(
        500,
        ge=0,
        description="While another batch of the model is executing, how long (µs) a queued request may wait for "
        "more rows to join it. A request finding a free slot and an empty queue starts at once; 0 = never wait.",
    )
    batch_max_queue_size: int = Field(
        1024, ge=1, description="Most requests queued per model version; more are refused with RESOURCE_EXHAUSTED."
    )
    batch_workers: int = Field(
        1, ge=1, description="Batches of one model version executing at once (and threads per version running them)."
    )
    batch_thread_idle_seconds: float = Field(
        30.0,
        gt=0,
        description="A model version's batch threads start with its first queued request and end after this long "
        "without work, so threads follow the versions in use, not the versions stored.",
    )
    batch_inline_below_us: int = Field(
        100,
        ge=0,
        description="A model whose single-request kernel call takes less than this (µs, measured while serving) "
        "runs each request at once on its caller's thread even while another batch executes: handing it to the "
        "batch thread would cost more than batching could save. Larger models queue and batch as usual. "
        "0 = always queue while busy. Also the other way round for streams: a stream's request expected to take "
        "this long or longer goes to the batch thread even when the model is idle, so the stream's reader takes "
        "the next message while it computes.",
    )
    batch_overrides: dict[str, BatchOverride] = Field(
        default_factory=dict,
        description="Per-model batching settings by model name (JSON in the environment), e.g. "
        '{"seed": {"max_batch_size": 256}}. A model\'s manifest may carry a "batching" object too; these win.',
    )
    @model_validator(mode="after")
    def _tls_files_go_together(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        return self

    @property
    def serves_reflection(self) -> bool:
        """Whether gRPC reflection is served (default: unless tokens are required)."""
        return self.reflection if self.reflection is not None else self.auth_tokens_file is None

    @property
    def stream_threads(self) -> int:
        """Threads of the stream pool: one per stream slot of every kind, and a few to refuse calls past them."""
        return (self.max_open_streams + self.max_open_uploads + self.max_open_optimizations
                + self.max_open_reflection_streams + 4)

    @property
    def poll_seconds(self) -> float:
        """The effective repository poll interval (0 = no polling)."""
        if self.repository_poll_seconds is not None:
            return self.repository_poll_seconds
        # an s3:// repository is shared with other machines by design: follow it by default
        return 1.0 if self.processes > 1 or self.repository_is_s3 else 0.0

    @property
    def repository_is_s3(self) -> bool:
        """Whether the repository is an ``s3://`` URI rather than a folder."""
        return isinstance(self.repository, str) and self.repository.startswith("s3://")

    stream_window: int = Field(
        16, ge=1, description="Requests of one stream in flight at once (read ahead, answered in order)."
    )
    stream_max_pending_bytes: int = Field(
        64 * MIB,
        ge=1,
        description="Most bytes of answers one stream may have computed and not yet sent (counted from the model's "
        "output size before computing): the stream reads its next request only below it (one request always goes "
        "through), so a client that does not read its answers cannot make the server hold more.",
    )

    metrics: bool = Field(True, description="Serve Prometheus metrics over HTTP at /metrics.")
    metrics_port: int = Field(8502, ge=0, le=65535, description="Port of the metrics endpoint; 0 picks a free one.")

    shutdown_grace_seconds: float = Field(5.0, ge=0, description="Time in-flight RPCs get to finish on SIGTERM.")
    log_level: Annotated[str, BeforeValidator(_log_level)] = Field("INFO", description="Python logging level.")

    optimize_max_jobs: int = Field(
        1, ge=1, description="Optimizations running at once; another Optimize call gets RESOURCE_EXHAUSTED."
    )
    optimize_max_data_bytes: int = Field(
        256 * MIB, ge=1, description="Largest .npz of training/evaluation data an Optimize call may stream."
    )
    optimize_max_epochs: int = Field(200, ge=0, description="Most fine-tuning epochs an Optimize call may ask for.")
    optimize_tf_threads: int = Field(
        1, ge=1, description="TensorFlow intra/inter-op threads for fine-tuning (applies only if TensorFlow has not "
        "started yet), so training leaves cores to predictions.",
    )
    optimize_val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of x set aside (seeded) when no x_val is sent: first the held-out rows "
        "that judge the result, then, when fine-tuning, from the rest the rows that choose candidates and stop "
        "training.",
    )
    optimize_latency_repeats: int = Field(
        15, ge=1, description="Timed samples per batch size and round when the optimizer measures latency."
    )
    optimize_time_budget_seconds: float = Field(
        900.0, gt=0, description="Wall-clock bound of one optimization's candidate search (fine-tuning included) "
        "when the call gives no time_budget_seconds; fine-tuning epochs are sized to fit in it.",
    )
    optimize_max_time_budget_seconds: float = Field(
        4 * 3600.0, gt=0, description="Largest time_budget_seconds an Optimize call may ask for (the job holds one "
        "of optimize_max_jobs slots for that long).",
    )
