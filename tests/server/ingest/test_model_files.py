"""`serve --model NAME=PATH` and a --repository folder of model files (KServe's /mnt/models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leanserve.server.errors import InvalidArgument
from leanserve.server.ingest.model_files import model_files_in, parse_model_arg, prepare
from leanserve.server.repository import artifacts
from leanserve.server.repository.store import Repository
from leanserve.server.runtime.plan import LayerSpec, build_plan
from tests.conftest import make_settings


def _leanserve_file(path: Path) -> Path:
    plan = build_plan((3,), [LayerSpec("o", np.eye(3, dtype=np.float32), np.zeros(3, np.float32), "linear")])
    manifest, blob = artifacts.plan_to_files(plan, "x", "y")
    artifacts.write_zip(path, manifest, blob)
    return path


def test_model_arg_parsing() -> None:
    assert parse_model_arg("seed=/mnt/models/model.h5") == ("seed", Path("/mnt/models/model.h5"))
    for bad in ("seed", "=x", "seed=", "../x=y"):
        with pytest.raises(InvalidArgument):
            parse_model_arg(bad)


def test_a_folder_of_files_is_not_a_repository(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    _leanserve_file(tmp_path / "files" / "model.leanserve")
    assert model_files_in(tmp_path / "files") == [tmp_path / "files" / "model.leanserve"]
    repo = Repository(tmp_path / "repo")
    with repo.staging() as staged:
        (staged / "manifest.json").write_text("{}")
        repo.commit("m", staged)
    _leanserve_file(tmp_path / "repo" / "stray.leanserve")
    assert model_files_in(tmp_path / "repo") == []  # it has model folders with versions: a repository


def test_prepare_publishes_once_into_a_writable_repository(tmp_path: Path) -> None:
    files = tmp_path / "mnt"
    files.mkdir()
    _leanserve_file(files / "model.leanserve")
    extra = _leanserve_file(tmp_path / "other.leanserve")
    settings = make_settings(files, repository_cache_dir=tmp_path / "writable")
    for _ in range(2):  # a restart publishes nothing new
        prepared = prepare(settings, [("other", extra)], model_name="seed")
        assert prepared.repository == tmp_path / "writable"
        assert Repository(prepared.repository).models() == {"other": [1], "seed": [1]}
    assert sorted(p.name for p in files.iterdir()) == ["model.leanserve"]
