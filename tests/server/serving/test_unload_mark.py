"""A model's unloaded mark (V2 RepositoryModelUnload) ends when its versions do or a new one is published.

It outlived a delete of every version, and ``leanserve publish`` never cleared it: the next version was stored
and shown UNAVAILABLE in RepositoryIndex, never served, not even after a restart."""

from __future__ import annotations

from pathlib import Path


from leanserve.client import Client
from leanserve.server.app import create_server
from leanserve.server.ingest.publish import publish_file
from tests.conftest import make_settings
from tests.toy import leanserve_file, wait_until


def test_delete_all_and_publish_end_the_unloaded_mark(repo_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(repo_dir, repository_poll_seconds=0.05)
    handle = create_server(settings)
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=60) as client:
            path = leanserve_file(tmp_path)[0]
            client.upload(path, "m")
            handle.dataplane.unload_model("m")
            assert client.delete("m") == [1]
            client.upload(path, "m")  # a new model of the same name: served
            assert client.models() == {"m": [2]}

            handle.dataplane.unload_model("m")
            publish_file(path, "m", settings)  # published beside the server, as `leanserve publish` does
            wait_until(lambda: client.models() == {"m": [2, 3]}, "the server serves what was published")
    finally:
        handle.stop(0)
