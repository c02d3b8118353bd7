"""Several processes on one repository folder or one S3 cache folder (``--processes`` > 1, two servers on a host, a
``leanserve publish`` beside a server): a sweep removes only the staging folders of writers that are gone (at once,
whatever their age) and never an upload in flight; cache entries are filled once, under a lock every process
honours."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from leanserve.server.repository.s3 import S3Repository
from leanserve.server.repository.store import MANIFEST, Repository
from leanserve.server.repository.version_files import STAGING

ROOT = Path(__file__).resolve().parents[3]

#: holds a staging folder open: prints its path, then commits it as model "m" when a line arrives on stdin
_HOLDER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from leanserve.server.repository.s3 import S3Repository
    from leanserve.server.repository.store import Repository
    if len(sys.argv) > 2:  # s3://... and its cache folder
        repo = S3Repository(sys.argv[1], cache_dir=Path(sys.argv[2]), sweep=False)
    else:
        repo = Repository(Path(sys.argv[1]), sweep=False)
    with repo.staging() as staged:
        (staged / "weights.bin").write_bytes(b"w" * 1000)
        (staged / "manifest.json").write_text(json.dumps({"payload": "held"}))
        print(staged, flush=True)
        sys.stdin.readline()
        print(repo.commit("m", staged), flush=True)
""")


def _holder(*args: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ))
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()[-3000:]
    return proc, Path(line)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _finish(proc: subprocess.Popen) -> int:
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return int(out.strip().splitlines()[-1])


def test_a_starting_repository_sweeps_only_dead_writers(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    Repository(root)
    live, live_dir = _holder(str(root))
    dead, dead_dir = _holder(str(root))
    _kill(dead)  # kill -9 mid-upload: the kernel released its lock
    try:
        Repository(root)  # another server starting on the folder sweeps
        assert live_dir.is_dir() and (live_dir / "weights.bin").exists()
        assert not dead_dir.exists() and not Path(f"{dead_dir}.lock").exists()
    finally:
        version = _finish(live)
    assert version == 1 and Repository(root).models() == {"m": [1]}
    assert list((root / ".staging").iterdir()) == []  # the owner removed its lock file too


def test_the_s3_cache_sweeps_dead_writers_at_once(uri: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    S3Repository(uri, cache_dir=cache)
    live, live_dir = _holder(uri, str(cache))
    dead, dead_dir = _holder(uri, str(cache))
    _kill(dead)
    try:
        S3Repository(uri, cache_dir=cache, sweep=True)  # a restart after the crash: not 24 h later
        assert not dead_dir.exists() and live_dir.is_dir()
    finally:
        version = _finish(live)
    assert S3Repository(uri, cache_dir=tmp_path / "other").models() == {"m": [version]}
    assert list((cache / STAGING).iterdir()) == []


#: fills one cache entry slowly (counting fills in a shared folder), starting when the file ``go`` appears
_FILLER = textwrap.dedent("""
    import json, sys, time, uuid
    from pathlib import Path
    from leanserve.server.repository import version_files
    from leanserve.server.repository.version_files import FILES_INDEX, VersionCache
    root, counts, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    manifest = json.dumps({"name": "m"}).encode()
    def fill(folder):
        (counts / uuid.uuid4().hex).touch()
        time.sleep(0.5)
        (folder / "weights.bin").write_bytes(b"w" * 1_000_000)
        facts = version_files.file_facts(folder / "weights.bin")
        (folder / FILES_INDEX).write_text(json.dumps({"weights.bin": facts}))
    cache = VersionCache(root)
    end = time.monotonic() + 30
    while not go.exists() and time.monotonic() < end:
        time.sleep(0.005)
    folders = [str(cache.get("m", v, manifest, fill)) for v in (1, 2)]
    print(json.dumps(folders))
""")


def test_processes_sharing_a_cache_fill_each_version_once(tmp_path: Path) -> None:
    root, counts, go = tmp_path / "cache", tmp_path / "counts", tmp_path / "go"
    counts.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _FILLER, str(root), str(counts), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(3)]
    time.sleep(1.0)  # let them import and wait for the start
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out))
    assert all(r == results[0] for r in results)
    assert len(list(counts.iterdir())) == 2  # one fill per version, whatever process did it
    for folder in results[0]:
        assert (Path(folder) / "weights.bin").stat().st_size == 1_000_000
        assert (Path(folder) / MANIFEST).is_file()


_READER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from leanserve.server.repository.s3 import S3Repository
    repo = S3Repository(sys.argv[1], cache_dir=Path(sys.argv[2]), sweep=False)
    out = {}
    for version in repo.versions("m"):
        out[version] = (repo.path("m", version) / "weights.bin").read_bytes().decode()
    print(json.dumps(out))
""")


def test_two_s3_processes_share_one_cache_folder(uri: str, tmp_path: Path) -> None:
    writer = S3Repository(uri, cache_dir=tmp_path / "writer")
    for v in range(12):
        with writer.staging() as staged:
            (staged / "weights.bin").write_text(f"v{v}" * 50_000)
            (staged / MANIFEST).write_text(json.dumps({"v": v}))
            writer.commit("m", staged)
    shared = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", _READER, uri, str(shared)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ)) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        got = json.loads(out)
        assert got == {str(v + 1): f"v{v}" * 50_000 for v in range(12)}
