"""Run an uploaded file through the server's own ingest pipeline in-process (detect, convert, tune, reference check,
write) and read the written version back the way a restart does, then run it: the fuzzers' oracle."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import numpy as np

from leanserve.server.errors import FailedPrecondition, InvalidArgument, LeanserveError, ResourceExhausted
from leanserve.server.ingest import build
from leanserve.server.ingest.uploads import UploadRequest
from leanserve.server.repository.loading import load_version
from leanserve.server.settings import Settings

#: what a hostile file may end in: accepted, or refused with one of these (a FailedPrecondition only when the
#: model loaded and computes, but not like its reference: a well-formed model the server declines)
ACCEPTABLE = ("OK", "InvalidArgument", "ResourceExhausted", "FailedPrecondition")


def settings(tmp: Path, **overrides: object) -> Settings:
    base: dict[str, object] = dict(repository=tmp / "models", reference_samples=8, autotune=False,
                                   warmup_batch_sizes=(1,), metrics=False)
    base.update(overrides)
    return Settings(**base)


def outcome(data: bytes, tmp: Path, cfg: Settings) -> str:
    """"OK" when ``data`` is accepted (and then serves a batch after being read back), else the refusal's class name.
    Anything else (another exception) propagates: for a test, that is the failure."""
    work = tmp / uuid.uuid4().hex
    staged = work / "staged"
    staged.mkdir(parents=True)
    source = work / "upload.bin"
    source.write_bytes(data)
    req = UploadRequest("fuzz", "", len(data), hashlib.sha256(data).hexdigest())
    try:
        manifest, _ = build.build(req, source, staged, cfg)
        served = load_version("fuzz", 1, staged, manifest.to_dict(), cfg)
        shape = [2, *(max(d, 1) for d in served.input.shape)]
        out = served.runner(np.zeros(shape, dtype=served.input.np_dtype))
        assert np.asarray(out).shape[0] == 2
        return "OK"
    except FailedPrecondition as exc:
        assert "reference" in exc.message, exc.message
        return "FailedPrecondition"
    except (InvalidArgument, ResourceExhausted) as exc:
        return "InvalidArgument" if isinstance(exc, InvalidArgument) else "ResourceExhausted"
    except LeanserveError as exc:  # NotFound, Internal... : not what a hostile file may produce
        raise AssertionError(f"{type(exc).__name__}: {exc.message}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
