"""Soak: a mixed load against ``leanserve serve --processes 2``, one process killed -9 and restarted mid-run.

Starts ``leanserve serve --processes 2`` on 127.0.0.1 port 0 with a temporary repository, then for ``--duration``
seconds (default 600, ``--quick`` 60) runs at once:

* V2 unary ``ModelInfer`` through ``tritonclient.grpc`` in separate client processes (its descriptors clash with
  ours in one process), each thread on its own connection, answers checked against the model;
* native (leanserve.v1) unary ``Predict`` and ``PredictStream`` streams, answers checked;
* uploads of a new version every few seconds, deletes of old versions, and one ``Optimize`` (int8) early on.

At ``--kill-at`` (a fraction of the run) the extra server process gets SIGKILL; the first process starts it again
(server/processes.py). Native calls use ``wait_for_ready`` (as a client of a restarting server should: without
it a call fails fast while its channel waits out gRPC's reconnect backoff, though no server ever saw it; the
tritonclient calls cannot set it). Every request is recorded with its start and end time and status, so a failure is either
in flight on the killed process (started before the kill, failed with UNAVAILABLE/CANCELLED after it) or lost.
RSS of both processes comes from /proc/<pid>/status (VmRSS). At the end the load stops, the server is stopped and
started again on the same repository, and every acknowledged version (uploads and the optimization, minus those
acknowledged as deleted) must be served and answer correctly.

    .venv/bin/python bench/soak.py [--quick] [--duration S] [--kill-at 0.4] [--v2-procs 2] [--v2-threads 2]

Prints a table and writes bench/results/soak.json. Loopback only; every loop is bounded in time and count, every
call has a timeout.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from soak_load import CALL_TIMEOUT_S, OPTIONS, SoakLoad, v2_worker, classify  # noqa: E402

FEATURES = 64
PROCESS_EXTENSION = "leanserve_process_index="


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="about one minute instead of ten")
    p.add_argument("--duration", type=float, help="seconds of load (default 600, quick 60)")
    p.add_argument("--kill-at", type=float, default=0.4, help="when to kill the extra process, as a fraction")
    p.add_argument("--v2-procs", type=int, default=2, help="tritonclient client processes")
    p.add_argument("--v2-threads", type=int, default=2, help="closed-loop threads per tritonclient process")
    p.add_argument("--native-threads", type=int, default=2, help="closed-loop native unary threads")
    p.add_argument("--upload-every", type=float, help="seconds between uploads (default 6, quick 3)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "soak.json")
    args = p.parse_args(argv)
    args.duration = args.duration or (60.0 if args.quick else 600.0)
    args.upload_every = args.upload_every or (3.0 if args.quick else 6.0)
    return args


# -- the server --------------------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` in MiB (None when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def extra_pid(server_pid: int) -> int | None:
    """The extra server process (a python child of the first one)."""
    pids = [p for p in children(server_pid) if rss_mb(p) is not None]
    return pids[0] if pids else None


def process_index(target: str, channel: Any = None) -> int:
    """Which process a connection (by default a fresh one) reaches, from ServerMetadata's extensions."""
    import grpc

    from leanserve.v2 import grpc_service_pb2 as v2
    from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc

    if channel is None:
        with grpc.insecure_channel(target, options=OPTIONS) as fresh:
            return process_index(target, fresh)
    md = v2_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(v2.ServerMetadataRequest(), timeout=10)
    return next(int(e[len(PROCESS_EXTENSION):]) for e in md.extensions if e.startswith(PROCESS_EXTENSION))


def start_server(repository: Path, processes: int) -> common.ServerProcess:
    argv = [str(common.VENV_BIN / "leanserve"), "serve", "--host", common.HOST, "--port", "0", "--repository",
            str(repository), "--processes", str(processes)]
    env = {"LEANSERVE_METRICS_PORT": "0", "LEANSERVE_LOG_LEVEL": "WARNING", "LEANSERVE_REPOSITORY_POLL_SECONDS": "0.5",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    return common.ServerProcess(f"soak-{processes}p", argv, env).start(ready_timeout=300)


def make_model(path: Path, seed: int) -> Any:
    """A small MLP (64 → 128 → 10) as a ``.leanserve`` file; returns its Plan (the answers' oracle)."""
    from leanserve.server.repository import artifacts
    from leanserve.server.runtime.plan import LayerSpec, build_plan

    rng = np.random.default_rng(seed)
    plan = build_plan((FEATURES,), [
        LayerSpec("h", rng.normal(0, 0.2, (FEATURES, 128)).astype(np.float32), np.zeros(128, np.float32), "relu"),
        LayerSpec("o", rng.normal(0, 0.2, (128, 10)).astype(np.float32), np.zeros(10, np.float32), "linear"),
    ])
    manifest, blob = artifacts.plan_to_files(plan, "x", "y")
    artifacts.write_zip(path, manifest, blob)
    return plan


# -- the run -----------------------------------------------------------------------------------------------------
class Soak(SoakLoad):
    """The run: the load threads (``SoakLoad``), the kill and restart, the checks at the end."""

    def monitor(self, server_pid: int) -> None:
        """RSS samples; the kill at ``kill_at``; when the extra process is back and serving."""
        every = 1.0 if self.args.quick else 5.0
        kill_at = self.t0 + self.args.duration * self.args.kill_at
        # the optimization finishes first when it can (its version is then checked at the end too)
        kill_latest = self.t0 + self.args.duration * max(self.args.kill_at, 0.7)
        killed: int | None = None
        for _ in range(1_000_000):
            if time.time() >= self.end:
                return
            extra = extra_pid(server_pid)
            for index, pid in ((0, server_pid), (1, extra)):
                mb = rss_mb(pid) if pid else None
                if mb is not None:
                    self.rss.append({"t": round(self.now(), 2), "process": index, "pid": pid, "rss_mb": round(mb, 1)})
            due = time.time() >= kill_at and ("optimize_done" in self.events or time.time() >= kill_latest)
            if killed is None and due and extra:
                os.kill(extra, signal.SIGKILL)
                killed = extra
                self.events["kill"] = self.now()
                self.events["killed_pid"] = extra
            if killed is not None and "restarted" not in self.events and extra and extra != killed:
                self.events["restarted"] = self.now()
                self.events["restarted_pid"] = extra
            if "restarted" in self.events and "serving_again" not in self.events:
                if any(self._reaches_index(1) for _ in range(8)):
                    self.events["serving_again"] = self.now()
            time.sleep(every)

    def _reaches_index(self, index: int) -> bool:
        try:
            return process_index(self.target) == index
        except Exception:  # noqa: BLE001 - not up yet
            return False

    # -- phases ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from leanserve.client import Client

        a = self.args
        stable = make_model(self.tmp / "stable.leanserve", 1)
        churn_file = self.tmp / "churn.leanserve"
        make_model(churn_file, 2)
        make_model(self.tmp / "opt.leanserve", 3)
        x = np.random.default_rng(0).normal(size=(1, FEATURES)).astype(np.float32)
        expected = stable.reference(x).astype(np.float32)

        server = start_server(self.repository, 2)
        self.target = server.target
        try:
            with Client(self.target, timeout=300) as c:
                c.wait_ready(120)
                for name in ("stable", "opt"):
                    self.acknowledged.add((name, c.upload(self.tmp / f"{name}.leanserve", name).version))
            self._wait_both_serve(x, expected)
            self.t0 = time.time()
            self.end = self.t0 + a.duration
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            v2 = [ctx.Process(target=v2_worker, args=(self.target, "stable", a.v2_threads, x, expected, self.t0,
                                                       self.end, out), daemon=True) for _ in range(a.v2_procs)]
            for p in v2:
                p.start()
            threads = [threading.Thread(target=self.native_unary, args=(x, expected), daemon=True)
                       for _ in range(a.native_threads)]
            threads += [threading.Thread(target=self.native_stream, args=(x, expected), daemon=True),
                        threading.Thread(target=self.uploads, args=(churn_file,), daemon=True),
                        threading.Thread(target=self.deletes, daemon=True),
                        threading.Thread(target=self.optimize, daemon=True),
                        threading.Thread(target=self.monitor, args=(server.proc.pid,), daemon=True)]
            for t in threads:
                t.start()
            rec = self.records["v2_unary"]
            for _ in v2:
                calls, wrong = out.get(timeout=a.duration + CALL_TIMEOUT_S + 120)
                rec.calls += calls
                rec.wrong_answers += wrong
            for p in v2:
                p.join(10)
                if p.is_alive():
                    p.kill()
            for t in threads:
                t.join(max(1.0, self.end - time.time() + 700))
            self.events["load_end"] = self.now()
            log_tail = server.log_tail(400)
        finally:
            server.stop(grace=10)
        consistency = self.check_repository(x)
        return self.report(consistency, log_tail)

    def _wait_both_serve(self, x: np.ndarray, expected: np.ndarray) -> None:
        """Until a fresh connection to each process answers ``stable`` correctly."""
        import grpc

        from leanserve.client import Client

        seen: set[int] = set()
        for _ in range(600):
            with Client(channel=grpc.insecure_channel(self.target, options=OPTIONS), timeout=30) as c:
                try:
                    if (np.allclose(c.predict("stable", x).outputs["y"], expected, atol=1e-4)
                            and c.info("opt").version == 1):
                        seen.add(process_index(self.target, c.channel))  # the same connection
                except grpc.RpcError:
                    pass
            if seen == {0, 1}:
                return
            time.sleep(0.1)
        raise RuntimeError(f"only processes {sorted(seen)} serve the models")

    def check_repository(self, x: np.ndarray) -> dict[str, Any]:
        """A fresh one-process server on the same repository: every acknowledged, undeleted version is served
        and answers like the model it came from."""
        import grpc

        from leanserve.client import Client

        with self.ack_lock:
            wanted = sorted(self.acknowledged - self.deleted)
        stored = {(m.parent.parent.name, int(m.parent.name))
                  for m in self.repository.glob("*/*/manifest.json") if m.parent.name.isdigit()}
        server = start_server(self.repository, 1)
        problems: list[str] = []
        served = 0
        try:
            with Client(server.target, timeout=120) as c:
                c.wait_ready(120)
                models = c.models()
                for name, version in wanted:
                    if version not in models.get(name, []):
                        problems.append(f"{name} v{version}: acknowledged but not served after a restart")
                        continue
                    try:
                        y = c.predict(name, x, version=version).outputs["y"]
                        served += bool(np.isfinite(y).all() and y.shape == (1, 10))
                    except grpc.RpcError as exc:
                        problems.append(f"{name} v{version}: {exc.code().name} {exc.details()}")
        finally:
            server.stop(grace=10)
        leftovers = sorted(p.name for p in (self.repository / ".staging").iterdir()) \
            if (self.repository / ".staging").exists() else []
        return {
            "acknowledged_versions": len(wanted), "served_and_answering": served, "problems": problems,
            "stored_not_acknowledged": sorted(f"{n} v{v}" for n, v in stored - set(wanted) - self.deleted
                                              if n == "churn" or n == "opt"),
            "deleted": len(self.deleted), "staging_leftovers_after_restart": leftovers,
        }

    def report(self, consistency: dict[str, Any], log_tail: str) -> dict[str, Any]:
        kill_t = self.events.get("kill")
        kinds = {k: {**classify(r.calls, kill_t,
                                frozenset({"OK", "NOT_FOUND"}) if k == "delete" else frozenset({"OK"})),
                     "wrong_answers": r.wrong_answers, "messages": dict(r.details)}
                 for k, r in self.records.items()}
        kinds["native_stream_requests"] = {**classify(self.stream_requests.calls, kill_t),
                                           "messages": dict(self.stream_requests.details)}
        # one-off growth is expected before this: the optimization imports TensorFlow (~0.5 GB) into whichever
        # process ran it, and the restarted process loads the repository
        settled = max(self.events.get(k, 0.0) for k in ("optimize_done", "serving_again", "kill")) + 2.0
        rss: dict[str, Any] = {"settled_after_s": round(settled, 1)}
        for index in (0, 1):
            for pid in sorted({s["pid"] for s in self.rss if s["process"] == index}):
                samples = [s for s in self.rss if s["pid"] == pid]
                later = [s for s in samples if s["t"] >= settled]
                rss[f"process {index} pid {pid}"] = {
                    "first_mb": samples[0]["rss_mb"], "max_mb": max(s["rss_mb"] for s in samples),
                    "last_mb": samples[-1]["rss_mb"], "samples": len(samples),
                    "settled_growth_mb": round(later[-1]["rss_mb"] - later[0]["rss_mb"], 1) if later else None,
                }
        return {
            "duration_s": self.args.duration, "quick": self.args.quick, "events": self.events, "calls": kinds,
            "rss": rss, "rss_samples": self.rss, "repository": consistency,
            "server_log_errors": [line for line in log_tail.splitlines() if " ERROR " in line or "Traceback" in line],
            "machine": common.machine_info(),
        }


def print_report(r: dict[str, Any]) -> None:
    ev = r["events"]
    print(f"\nsoak: {r['duration_s']:.0f} s of mixed load on --processes 2; extra process pid {ev.get('killed_pid')} "
          f"killed -9 at {ev.get('kill', float('nan')):.1f} s, restarted as pid {ev.get('restarted_pid')} at "
          f"{ev.get('restarted', float('nan')):.1f} s, serving again at {ev.get('serving_again', float('nan')):.1f} s")
    print(f"\n{'calls':<24}{'total':>8}{'ok':>8}{'in flight on killed':>21}{'lost':>6}  {'other codes'}")
    for kind, c in r["calls"].items():
        ok = c["by_code"].get("OK", 0)
        others = {k: v for k, v in c["by_code"].items() if k != "OK"}
        wrong = f", {c['wrong_answers']} wrong answers" if c.get("wrong_answers") else ""
        print(f"{kind:<24}{c['calls']:>8}{ok:>8}{c['in_flight_on_killed']:>21}{c['lost']:>6}  {others or ''}{wrong}")
        for message, n in list(c.get("messages", {}).items())[:3]:
            print(f"{'':<24}{n:>8}× {message[:110]}")
    settled = r["rss"]["settled_after_s"]
    print(f"\n{'RSS (MiB)':<28}{'first':>8}{'max':>8}{'last':>8}{f'growth after {settled:.0f} s':>20}")
    for name, s in r["rss"].items():
        if isinstance(s, dict):
            growth = "-" if s["settled_growth_mb"] is None else f"{s['settled_growth_mb']:.1f}"
            print(f"{name:<28}{s['first_mb']:>8.0f}{s['max_mb']:>8.0f}{s['last_mb']:>8.0f}{growth:>20}")
    repo = r["repository"]
    print(f"\nrepository after a restart: {repo['served_and_answering']} of {repo['acknowledged_versions']} "
          f"acknowledged versions served and answering; {repo['deleted']} deleted; problems: "
          f"{repo['problems'] or 'none'}; stored but never acknowledged: {repo['stored_not_acknowledged'] or 'none'}")
    if r["server_log_errors"]:
        print(f"server log ERROR/Traceback lines (last 400 lines): {len(r['server_log_errors'])}")
        for line in r["server_log_errors"][:5]:
            print("   ", line[:200])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="leanserve-soak-") as tmp:
        result = Soak(args, Path(tmp)).run()
    print_report(result)
    common.write_json(args.out, result)
    print(f"\nwrote {args.out}")
    lost = sum(c["lost"] + c.get("wrong_answers", 0) for c in result["calls"].values())
    return 0 if not lost and not result["repository"]["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
