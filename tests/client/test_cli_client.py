"""The client verbs of the ``leanserve`` command against a real server (in-process, 127.0.0.1:0): how a failed
request inside a stream is reported, local input problems (one ``error:`` line, exit 2, nothing sent), where
``--output`` writes, ``--top-k`` without top_k, a reader of stdout that goes away, and ``info`` of an optimized
version."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client.cli_output import status_name
from leanserve.server.app import ServerHandle, create_server
from leanserve.server.cli import main
from leanserve.server.errors import FailedPrecondition
from leanserve.server.serving.model import ServedModel, TensorSignature
from tests.conftest import make_settings
from tests.serverproc import LEANSERVE, server_env
from tests.toy import toy_model


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder of this test's files only (the server's repository is tmp_path/models)."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """One server for the module (none of its tests changes what the others see): ``toy``, float32 [batch, 4] →
    y = 2x, version 1 only; ``picky``, the same but refusing a batch holding a negative value."""
    handle = create_server(make_settings(tmp_path_factory.mktemp("cli") / "models"))
    handle.dataplane.serve(toy_model(lambda x: x * 2, name="toy", features=4))
    handle.dataplane.serve(toy_model(_picky, name="picky", features=4))
    yield handle
    handle.stop(0.5)


def _picky(x: np.ndarray) -> np.ndarray:
    if (x < 0).any():
        raise FailedPrecondition("negative values are not served")
    return x * 2


@pytest.fixture
def addr(module_server: ServerHandle) -> str:
    return f"127.0.0.1:{module_server.port}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``leanserve ARGV`` in-process: (exit status, stdout, stderr). A traceback would fail the test itself."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def save(path: Path, a: np.ndarray) -> str:
    np.save(path, a)
    return str(path)


# -- a failed request inside a stream ------------------------------------------------------------------------------

def test_a_failed_stream_request_is_reported_like_a_failed_call(addr: str, work: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = save(work / "bad.npy", np.zeros((20, 5), np.float32))  # 5 features, the model takes 4
    status, out, err = run(capsys, "predict", "toy", "--input", bad, "--stream", "--batch-size", "8",
                           "--server", addr)
    assert status == 1 and out == ""
    assert err.startswith("error INVALID_ARGUMENT: input 'x' of model 'toy'") and "(stream request 0: rows 0..7)" in err
    assert len(err.strip().splitlines()) == 1, err

    status, out, err = run(capsys, "predict", "toy", "--input", bad, "--stream", "--batch-size", "8",
                           "--server", addr, "--json")
    assert status == 1
    streamed = json.loads(out)["error"]
    assert streamed["code"] == "INVALID_ARGUMENT" and "expected shape" in streamed["message"]
    assert streamed["request_id"] == "0"

    status, out, _ = run(capsys, "predict", "toy", "--input", bad, "--server", addr, "--json")  # the unary path
    unary = json.loads(out)["error"]
    assert status == 1 and unary["code"] == streamed["code"] and set(unary) <= set(streamed)


def test_a_stream_request_failing_midway_names_its_rows(addr: str, work: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    x = np.ones((20, 4), np.float32)
    x[11] = -1  # in the second batch of 8
    status, out, err = run(capsys, "predict", "picky", "--input", save(work / "x.npy", x), "--stream",
                           "--batch-size", "8", "--output", str(work / "y.npy"), "--server", addr)
    assert status == 1 and out == ""
    assert err.strip() == ("error FAILED_PRECONDITION: negative values are not served (stream request 1: "
                           "rows 8..15)")
    assert sorted(p.name for p in work.iterdir()) == ["x.npy"]  # no partial output


def test_an_empty_input_is_answered_the_same_with_and_without_stream(addr: str, work: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """No rows: the stream still sends one (empty) request, so the server's answer is reported, not version 0
    and an empty archive."""
    empty = save(work / "empty.npy", np.zeros((0, 4), np.float32))
    out_file = work / "e.npy"
    answers = []
    for extra in ([], ["--stream"]):
        status, out, _ = run(capsys, "predict", "toy", "--input", empty, "--output", str(out_file), *extra,
                             "--server", addr, "--json")
        assert status == 1
        answers.append(json.loads(out)["error"]["code"])
    assert answers == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert list(work.iterdir()) == [work / "empty.npy"]  # nothing written


@pytest.mark.parametrize("code, name", [(3, "INVALID_ARGUMENT"), (grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
                                        ("UNAVAILABLE", "UNAVAILABLE"), (999, "UNKNOWN"), (None, "UNKNOWN"),
                                        (lambda: grpc.StatusCode.INTERNAL, "INTERNAL")],
                         ids=["number", "StatusCode", "name", "unknown number", "None", "RpcError.code"])
def test_status_names(code: object, name: str) -> None:
    assert status_name(code) == name


# -- local input problems: one line naming the file or option, exit 2, nothing on stdout ---------------------------

def _inputs(tmp: Path) -> dict[str, str]:
    np.savez(tmp / "train.npz", x=np.zeros((3, 4)), y=np.zeros(3))
    (tmp / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    (tmp / "truncated.npy").write_bytes(b"\x93NUMPY\x01\x00")
    return {"train.npz": str(tmp / "train.npz"), "model.h5": str(tmp / "model.h5"),
            "truncated.npy": str(tmp / "truncated.npy"), "words.npy": save(tmp / "words.npy", np.array(["a", "b"])),
            "scalar.npy": save(tmp / "scalar.npy", np.float32(1)), "x.npy": save(tmp / "x.npy", np.ones((3, 4))),
            "missing": str(tmp / "nonexist.npy"), "folder": str(tmp)}


LOCAL_PROBLEMS = [
    (["predict", "toy", "--input", "missing"], "--input {missing}: no such file"),
    (["predict", "toy", "--input", "missing", "--stream"], "--input {missing}: no such file"),
    (["predict", "toy", "--input", "folder"], "--input {folder}: is a directory"),
    (["predict", "toy", "--input", "train.npz"], "--input {train.npz}: is an .npz archive (x, y)"),
    (["predict", "toy", "--input", "model.h5"], "--input {model.h5}: not an .npy file"),
    (["predict", "toy", "--input", "truncated.npy"], "--input {truncated.npy}: cannot read this .npy file"),
    (["predict", "toy", "--input", "words.npy"], "--input {words.npy}: holds <U1 values, which cannot be sent"),
    (["predict", "toy", "--input", "scalar.npy"], "--input {scalar.npy}: holds a single value"),
    (["predict", "toy", "--input", "x.npy", "--top-k", "3"], "--top-k needs --postprocess top_k"),
    (["predict", "toy", "--input", "x.npy", "--batch-size", "2"], "--batch-size needs --stream"),
    (["models", "--tls-ca", "x.npy"], "models: error: "),  # not a PEM file: refused here, not UNAVAILABLE later
    (["models", "--tls-ca", "missing"], "models: error: "),
    (["predict", "toy", "--input", "x.npy", "--postprocess", "top_k", "--output", "tk.npy"],
     "--output tk.npy: --postprocess top_k returns two arrays (indices, scores); name an .npz file"),
    (["predict", "toy", "--input", "x.npy", "--output", "nodir/y.npy"], "folder nodir does not exist"),
    (["upload", "missing", "--name", "m"], "upload: error: {missing}: no such file"),
    (["optimize", "toy", "--data", "missing", "--quantize", "int8"], "--data {missing}: no such file"),
]


@pytest.mark.parametrize("argv, complaint", LOCAL_PROBLEMS, ids=[" ".join(argv) for argv, _ in LOCAL_PROBLEMS])
def test_local_input_problems_exit_2_with_one_line(argv: list[str], complaint: str, addr: str, work: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)
    files = _inputs(work)
    before = sorted(work.iterdir())
    status, out, err = run(capsys, *[files.get(a, a) for a in argv], "--server", addr, "--json")
    assert status == 2 and out == ""
    for key, path in files.items():
        complaint = complaint.replace("{" + key + "}", path)
    assert f"leanserve {argv[0]}: error: " in err and complaint in err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(work.iterdir()) == before  # nothing written


# -- --output: the file written is the file reported --------------------------------------------------------------

@pytest.mark.parametrize("name, postprocess, arrays", [
    ("y.npy", [], None),
    ("y.out", [], None),  # numpy's own np.save would have written y.out.npy
    ("y.npz", [], ["y"]),
    ("top.NPZ", ["--postprocess", "top_k", "--top-k", "3"], ["indices", "scores"]),
], ids=["y.npy", "y.out", "y.npz", "top_k top.NPZ"])
def test_output_is_written_where_it_is_reported(name: str, postprocess: list[str], arrays: list[str] | None,
                                                addr: str, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    target = work / name
    for extra in ([], ["--stream", "--batch-size", "2"]):
        status, out, _ = run(capsys, "predict", "toy", "--input", save(work / "x.npy", x), "--output",
                             str(target), *postprocess, *extra, "--server", addr, "--json")
        assert status == 0
        summary = json.loads(out)
        assert summary["written"] == str(target) and summary["version"] == 1 and summary["rows"] == 5
        assert sorted(p.name for p in work.iterdir()) == sorted(["x.npy", name])
        if arrays is None:
            np.testing.assert_array_equal(np.load(target), x * 2)
        else:
            with np.load(target) as archive:
                assert sorted(archive.files) == arrays
                if "indices" in arrays:
                    np.testing.assert_array_equal(archive["indices"], np.tile([3, 2, 1], (5, 1)))
        target.unlink()


# -- argument checks at parse time ---------------------------------------------------------------------------------

BAD_NUMBERS = [
    (["predict", "m", "--input", "x.npy", "--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
    (["predict", "m", "--input", "x.npy", "--top-k", "-1"], "argument --top-k: must be a positive integer"),
    (["predict", "m", "--input", "x.npy", "--version", "-2"], "argument --version: must be 0 or more, got -2"),
    (["set-default", "m", "-3"], "argument version: must be 0 or more, got -3"),
    (["optimize", "m", "--epochs", "-1"], "argument --epochs: must be 0 or more"),
    (["info", "m", "--version", "4294967296"], "must be less than 2**32"),
    (["models", "--timeout", "0"], "argument --timeout: must be a number above 0"),
]


@pytest.mark.parametrize("argv, complaint", BAD_NUMBERS, ids=[" ".join(argv) for argv, _ in BAD_NUMBERS])
def test_numbers_are_checked_while_parsing(argv: list[str], complaint: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: leanserve" in err and complaint in err


# -- a reader of stdout that goes away (`| head -1`) ---------------------------------------------------------------

@pytest.mark.parametrize("argv", [["info", "toy", "--json"], ["info", "toy"], ["info", "nope", "--json"]],
                         ids=" ".join)
def test_a_closed_stdout_ends_the_command_quietly(argv: list[str], addr: str) -> None:
    """stdout is a pipe whose reader is gone before the command writes (what ``| head -1`` becomes once head has
    its line): no traceback, status 1, as the signal module's "Note on SIGPIPE" describes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*LEANSERVE, *argv, "--server", addr], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=server_env(), stdin=subprocess.DEVNULL, check=False)
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr and "Exception" not in proc.stderr


# -- info of an optimized version ------------------------------------------------------------------------------------

#: the parts of a real ``leanserve optimize m --prune 0.5 --quantize int8`` report that ``info`` shows
REPORT = {
    "from_version": 1, "metric": "agreement_random", "eval_rows": 512, "eval_source": "random", "held_out": False,
    "before": {"metric": 1.0, "size_bytes": 3480, "latency_seconds": {"1": 2.47e-06, "32": 6.44e-06},
               "layers": [{"name": "h", "format": "dense_f32", "sparsity": 0.0}]},
    "after": {"metric": 0.755859375, "size_bytes": 1268, "latency_seconds": {"1": 4.63e-06, "32": 1.055e-05},
              "layers": [{"name": "h", "format": "bsr_int8", "sparsity": 0.5}]},
    "max_accuracy_drop": 0.3, "within_budget": True, "promoted": True,
    "chosen": {"label": "0.50 unstructured int8 one-shot", "granularity": "per_layer", "sparsity": 0.5},
    "search": {"mode": "budget", "stopped": "within budget", "skipped": [], "time_budget_seconds": 900.0},
    "candidates": [{"label": "0.50 unstructured int8 one-shot"}], "elapsed_seconds": 53.5,
    "tf_reference": {"max_abs_error": 0.087, "rows": 512},
    "summary": "within budget: 0.50 unstructured int8 one-shot (agreement_random 0.7559 vs 1.0000 on 512 random "
               "rows, 36.4% of the size)",
}


def test_info_shows_the_optimization_report(server: ServerHandle, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    addr = f"127.0.0.1:{server.port}"
    server.dataplane.serve(toy_model(lambda x: x * 2, name="toy", features=4))
    server.dataplane.serve(ServedModel(
        name="toy", version=2, runtime="plan", input=TensorSignature("x", "float32", (4,)),
        output=TensorSignature("y", "float32", (4,)), runner=lambda x: x * 2,
        manifest={"source": {"format": "optimized", "from_version": 1}, "metadata": {"optimization": REPORT}},
    ))
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    status, out, _ = run(capsys, "info", "toy", "--version", "2", "--server", addr)
    assert status == 0
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if "│" in line}
    assert rows["optimized from"] == "v1: 0.50 unstructured int8 one-shot per layer"
    assert rows["optimization"] == REPORT["summary"]
    assert rows["agreement_random"] == ("1.0000 → 0.7559 (drop 24.41 points on 512 random rows; within the budget "
                                        "of 30.00)")
    assert rows["weights size"] == "3,480 B → 1,268 B (36.4%)"
    assert rows["latency b=1"] == "2.5 µs → 4.6 µs" and rows["latency b=32"] == "6.4 µs → 10.6 µs"
    assert rows["search"] == "budget: 1 candidate, within budget, 54 s"
    assert rows["promoted"].startswith("yes") and "source" not in rows  # no uploaded file: no "0 B sha256 …"

    status, out, _ = run(capsys, "info", "toy", "--version", "2", "--server", addr, "--json")
    assert status == 0 and json.loads(out)["metadata"] == {"optimization": REPORT}

    status, out, _ = run(capsys, "info", "toy", "--version", "1", "--server", addr)  # an uploaded version
    assert status == 0 and "source" in out and "optimized from" not in out


def test_a_stream_is_scored_by_one_version_when_the_default_moves(tmp_path: Path, work: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Without --version each request named "the default": a set-default (or an upload) during a long run
    scored the rest of the file with another version, and the output said only one."""
    handle = create_server(make_settings(tmp_path / "models"))
    handle.dataplane.serve(toy_model(lambda x: x * 2, name="mv", version=1, features=4))
    moved = []

    def triple_then_move_default(x: np.ndarray) -> np.ndarray:
        if not moved:  # the default moves back to version 1 while the stream's first request computes
            moved.append(True)
            handle.dataplane.registry.set_default("mv", 1)
        return x * 3

    handle.dataplane.serve(toy_model(triple_then_move_default, name="mv", version=2, features=4))
    try:
        x = np.arange(400 * 4, dtype=np.float32).reshape(400, 4)
        status, out, err = run(capsys, "predict", "mv", "--server", f"127.0.0.1:{handle.port}", "--input",
                               save(work / "x.npy", x), "--output", str(work / "y.npy"), "--stream",
                               "--batch-size", "2", "--json")
        assert status == 0, err
        assert moved and json.loads(out)["version"] == 2
        np.testing.assert_array_equal(np.load(work / "y.npy"), x * 3)
    finally:
        handle.stop(0)
