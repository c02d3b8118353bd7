"""Two server processes' worth of state on one repository: each follows what the other changes (by polling)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.v2 import grpc_service_pb2 as pb
from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc
from leanserve.server.app import ServerHandle, create_server
from tests.conftest import make_settings
from tests.toy import leanserve_file, wait_until


@pytest.fixture
def pair(repo_dir: Path) -> Iterator[tuple[Client, Client, ServerHandle]]:
    """Servers A and B on the same repository, both polling every 50 ms (B as an extra process would)."""
    a = create_server(make_settings(repo_dir, repository_poll_seconds=0.05))
    b = create_server(make_settings(repo_dir, repository_poll_seconds=0.05, process_index=1))
    with Client(f"127.0.0.1:{a.port}", timeout=60) as ca, Client(f"127.0.0.1:{b.port}", timeout=60) as cb:
        yield ca, cb, b
    a.stop(0)
    b.stop(0)


def test_the_other_server_follows_uploads_pins_deletes_and_unloads(pair, tmp_path: Path) -> None:
    a, b, _ = pair
    path1, plan1 = leanserve_file(tmp_path, 1)
    path2, plan2 = leanserve_file(tmp_path, 2)
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)

    a.upload(path1, "m")
    wait_until(lambda: b.models() == {"m": [1]}, "B serves version 1")
    np.testing.assert_array_equal(b.predict("m", x).outputs["y"], a.predict("m", x).outputs["y"])

    b.upload(path2, "m")  # version numbers come from the shared repository, not from either process
    wait_until(lambda: a.models() == {"m": [1, 2]}, "A serves version 2 uploaded through B")
    np.testing.assert_allclose(a.predict("m", x).outputs["y"], plan2.reference(x), atol=1e-5)

    a.set_default("m", 1)
    wait_until(lambda: b.predict("m", x).model_version == 1, "B follows the pinned default")
    np.testing.assert_allclose(b.predict("m", x).outputs["y"], plan1.reference(x), atol=1e-5)

    a.delete("m", 1)
    wait_until(lambda: b.models() == {"m": [2]}, "B stops serving the deleted version")
    assert b.predict("m", x).model_version == 2  # the pin went with the version

    a.delete("m")
    wait_until(lambda: b.models() == {}, "B stops serving the deleted model")
    with pytest.raises(grpc.RpcError) as err:
        b.predict("m", x)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_unload_and_load_reach_every_process(pair, tmp_path: Path) -> None:
    a, b, handle_b = pair
    a.upload(leanserve_file(tmp_path, 3)[0], "u")
    wait_until(lambda: b.models() == {"u": [1]}, "B serves u")
    v2 = pb_grpc.GRPCInferenceServiceStub(a.channel)  # A's Open Inference Protocol endpoint

    v2.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="u"), timeout=30)
    wait_until(lambda: b.models() == {}, "B unloads u too")
    assert handle_b.dataplane.repository.versions("u") == [1]  # unloaded, still stored
    v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="u"), timeout=30)
    wait_until(lambda: b.models() == {"u": [1]}, "B loads u again")


def test_a_restart_keeps_a_model_unloaded(repo_dir: Path, tmp_path: Path) -> None:
    first = create_server(make_settings(repo_dir))
    with Client(f"127.0.0.1:{first.port}", timeout=60) as c:
        c.upload(leanserve_file(tmp_path, 4)[0], "kept")
    first.dataplane.unload_model("kept")
    first.stop(0)
    second = create_server(make_settings(repo_dir))
    try:
        assert second.dataplane.list_models() == {}
        assert second.dataplane.load_model("kept") == [1]
        assert second.dataplane.list_models() == {"kept": [1]}
    finally:
        second.stop(0)
