"""One ``s3://BUCKET/PREFIX`` as the S3 repository uses it: list, bounded reads, writes, deletes, file transfers.

Keys are relative to the prefix everywhere. boto3's failures come back as leanserve errors: NotFound for a missing
key, Unavailable for anything else the store answers or when it cannot be reached; a conditional write the store
refused (``If-None-Match: *`` on an existing key) is Unavailable too. Sizes are counted while reading, never taken
from a header.

Configuration is boto3's own (environment and shared files), plus an explicit endpoint URL or a ready client.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leanserve.server.errors import InvalidArgument, LeanserveError, NotFound, Unavailable, shown
from leanserve.server.repository.version_files import CHUNK

SCHEME = "s3://"


def is_s3_uri(location: object) -> bool:
    """True for ``s3://...`` locations."""
    return isinstance(location, str) and location.startswith(SCHEME)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix without surrounding slashes) of ``s3://BUCKET[/PREFIX]``; InvalidArgument otherwise."""
    if not is_s3_uri(uri):
        raise InvalidArgument(f"not an s3:// URI: {shown(uri)}")
    bucket, _, prefix = uri[len(SCHEME):].partition("/")
    if not bucket:
        raise InvalidArgument(f"no bucket in {shown(uri)}: use s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


@dataclass
class S3Object:
    """One listed object."""

    etag: str
    size: int
    modified: dt.datetime


class S3Bucket:
    """The objects under one bucket prefix (thread-safe: boto3 clients are)."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None, client: Any = None) -> None:
        import boto3
        from botocore.config import Config

        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(uri)
        # boto3 reads the endpoint, credentials, region and profile from its usual environment and files
        self._s3 = client or boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def key(self, rel: str) -> str:
        """The bucket key of ``rel``."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        """One S3 request; NotFound for a missing key, Unavailable for anything else the store answers."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise NotFound(f"{what}: not in the repository") from None
            if code in {"PreconditionFailed", "412"}:
                raise
            raise Unavailable(f"{what}: the S3 repository {self.uri} answered {code or exc}") from None
        except BotoCoreError as exc:
            raise Unavailable(f"{what}: cannot reach the S3 repository {self.uri}: {exc}") from None

    def check(self) -> None:
        """NotFound / Unavailable unless the bucket exists and answers."""
        self._call("open the repository", self._s3.head_bucket)

    def list(self, rel_prefix: str) -> dict[str, S3Object]:
        """Every object under ``rel_prefix`` (relative keys), following pages."""
        out: dict[str, S3Object] = {}
        token: str | None = None
        cut = len(self.key(""))
        while True:
            kwargs: dict[str, Any] = {"Prefix": self.key(rel_prefix)}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list the repository", self._s3.list_objects_v2, **kwargs)
            for obj in page.get("Contents", []):
                out[obj["Key"][cut:]] = S3Object(str(obj.get("ETag", "")), int(obj.get("Size", 0)),
                                                 obj.get("LastModified") or dt.datetime.now(dt.timezone.utc))
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")
            if not token:
                return out

    def get(self, rel: str, max_bytes: int | None = None) -> tuple[str, bytes]:
        """(ETag, bytes) of one object; reads at most ``max_bytes`` (InvalidArgument past it)."""
        resp = self._call(f"read {rel}", self._s3.get_object, Key=self.key(rel))
        body = resp["Body"]
        try:
            data = body.read() if max_bytes is None else body.read(max_bytes + 1)
        finally:
            body.close()
        if max_bytes is not None and len(data) > max_bytes:
            raise InvalidArgument(f"{rel} in the repository is larger than {max_bytes} bytes")
        return str(resp.get("ETag", "")), data

    def put(self, rel: str, data: bytes, *, if_absent: bool = False) -> str:
        """Write one object; returns its ETag. ``if_absent`` sends ``If-None-Match: *``."""
        kwargs: dict[str, Any] = {"Key": self.key(rel), "Body": data}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        try:
            return str(self._call(f"write {rel}", self._s3.put_object, **kwargs).get("ETag", ""))
        except LeanserveError:
            raise
        except Exception as exc:  # PreconditionFailed: a store that honours If-None-Match saw the key exist
            raise Unavailable(f"{rel} already exists in the repository: {exc}") from None

    def delete(self, rels: list[str]) -> None:
        """Delete objects; a missing one is not an error."""
        for rel in rels:
            try:
                self._call(f"delete {rel}", self._s3.delete_object, Key=self.key(rel))
            except NotFound:
                pass

    def upload(self, rel: str, path: Path) -> None:
        """Write a local file as one object (multipart for large files, boto3's transfer manager)."""
        self._call(f"upload {rel}", self._s3.upload_file, Filename=str(path), Key=self.key(rel))

    def download(self, rel: str, target: Path, size: int) -> None:
        """Write one object to ``target``, refusing more than ``size`` bytes (counted while reading)."""
        resp = self._call(f"read {rel}", self._s3.get_object, Key=self.key(rel))
        body, got = resp["Body"], 0
        try:
            with open(target, "wb") as out:
                for chunk in body.iter_chunks(CHUNK):
                    got += len(chunk)
                    if got > size:
                        raise InvalidArgument(f"{rel} grew while it was downloaded")
                    out.write(chunk)
        finally:
            body.close()
