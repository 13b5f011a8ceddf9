"""Scale (issue 13), the operator's side: 1 to 100 studies of `parallel: 10` on one operator.

    python bench/operator_scale.py                      # 1, 10, 50, 100 studies, 60 s trials (about 15 minutes)
    python bench/operator_scale.py --quick              # 1 and 3 studies, short trials (CI)
    python bench/operator_scale.py --operator-code DIR  # the same with another checkout's operator (before/after)

Everything is real but the trainer and the nodes: the Kubernetes API emulator over HTTP in its own
process (tests.k8s.serve: in this process it would share the GIL with a thousand pods' kubelet and
measure the harness), a throwaway PostgreSQL, and the operator as its own process (`python -m
strata.kube`, default settings: 5 s safety-net timer, Secrets from the API). The test kubelet runs
each trainer pod; its container is the torch-free stand-in trainer (strata_trainer.standin), run in
this process (threads sharing one Optuna storage, each study loaded once) rather than as 1,000
Python processes on 2 cores: after --trial-seconds it reports an intermediate value, sets the
trainer's attrs and tells Optuna, then the kubelet reports the pod Succeeded, as for a real pod.

Per size, over a window after every study has had its first 10 pods and one trial time more:
operator CPU (cores) and peak memory (RSS high-water mark), reconciles per second, Kubernetes API
requests per reconcile (all the operator sent, Kopf's and its own, counted by the emulator),
Optuna storage calls per reconcile (the operator's timed storage, also by method) and SQL
statements, the p50/p95/p99 hand-off as the API server saw it (a trial pod's status said it ended
-> the study's next pod created; a slot still free when the window closes counts until then), and
the largest HPOStudy status.

Writes results.json and results.md into --out (default bench/results/operator-scale-<timestamp>).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.k8s.emulator import now_rfc3339  # noqa: E402
from tests.k8s.kubelet import LocalKubelet, _running_status, _terminated_status  # noqa: E402

PARALLEL = 10
NAMESPACE = "default"
BENCH_AGENT = "strata-bench"
KUBELET_AGENT = "strata-test-kubelet"


def study_manifest(name: str, epochs: int) -> dict[str, Any]:
    return {"apiVersion": "hpo.strata.dev/v1alpha1", "kind": "HPOStudy",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "searchSpace": {
                    "convLayers": {"type": "int", "low": 1, "high": 3},
                    "filters": {"type": "categorical", "choices": [8, 16, 32]},
                    "learningRate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                },
                "sampler": {"name": "tpe", "seed": 1},
                "trials": {"max": 100_000, "parallel": PARALLEL, "maxFailed": 1000},
                "training": {"epochs": epochs},
                "reuse": {"enabled": False},
                "storage": {"databaseSecret": {"name": "strata-db", "key": "url"}},
                "execution": {"mode": "perTrial"},
            }}


class RemoteCluster:
    """The emulator in its own process (tests.k8s.serve): what the kubelet and this script need of
    EmulatedCluster (url, token, env, create, list), plus the server's own records (stats)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.handler = types.SimpleNamespace(pod_logs=None)  # LocalKubelet serves logs through it
        self.process: subprocess.Popen | None = None
        self.url = self.token = ""
        self._seq = 0

    def start(self) -> "RemoteCluster":
        from tests.services import wait_for

        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "emulator.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.k8s.serve", str(self.workdir)], cwd=ROOT,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        info = self.workdir / "cluster.json"
        wait_for(lambda: info.exists() or self.process.poll() is not None, timeout=60, interval=0.1)
        if not info.exists():
            raise RuntimeError(f"the emulator exited with {self.process.returncode}: see {self.workdir / 'emulator.log'}")
        data = json.loads(info.read_text())
        self.url, self.token, self.kubeconfig = data["url"], data["token"], data["kubeconfig"]
        return self

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": self.kubeconfig}

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}", "User-Agent": BENCH_AGENT,
                                                  "Content-Type": "application/json", "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def create(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("POST", path, body)

    def stats(self) -> dict[str, Any]:
        """The server's records now (requests per agent, pods' created/ended times, status sizes)."""
        from tests.services import wait_for

        self._seq += 1
        self.process.send_signal(signal.SIGUSR1)
        path = self.workdir / "stats.json"

        def fresh() -> dict[str, Any] | None:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            return data if data["seq"] >= self._seq else None
        wait_for(lambda: fresh() is not None, timeout=60, interval=0.1)
        return fresh()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


class StandinKubelet(LocalKubelet):
    """The test kubelet with each trainer container run in-process by the stand-in trainer: the pod
    runs for trial_seconds, then the stand-in reports an epoch and tells Optuna (each study loaded
    once), then the pod is reported Succeeded (or Failed with the stand-in's exit code)."""

    def __init__(self, *args: Any, storage_url: str, trial_seconds: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.storage_url, self.trial_seconds = storage_url, trial_seconds
        self.trials = ThreadPoolExecutor(max_workers=4, thread_name_prefix="standin")
        self._storage = None
        self._studies: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.errors: list[str] = []  # a stand-in that raised: its pod fails, the row says why

    def _run_trial(self, study_name: str, number: int) -> int:
        from strata.retrying_storage import open_trial_storage
        from strata.study import load_study
        from strata_trainer.standin import StandinConfig, run_loaded_trial

        with self._lock:
            if self._storage is None:
                self._storage = open_trial_storage(self.storage_url)
            if study_name not in self._studies:
                self._studies[study_name] = load_study(study_name, self._storage)
        study, spec = self._studies[study_name]
        return run_loaded_trial(study, spec, number, StandinConfig(epoch_seconds=0.0))

    async def _run_process(self, run, container, argv, env) -> None:
        if "--trial" not in argv:
            return await super()._run_process(run, container, argv, env)
        started = now_rfc3339()
        await self._report(run, _running_status(container, started))
        study, number = argv[argv.index("--study") + 1], int(argv[argv.index("--trial") + 1])
        await asyncio.sleep(self.trial_seconds)
        code = 1
        if not run.deleted:
            try:
                code = await asyncio.get_running_loop().run_in_executor(self.trials, self._run_trial, study, number)
            except Exception as error:  # noqa: BLE001 (the harness's own fault: reported, never a hung pod)
                self.errors.append(f"{study} trial {number}: {type(error).__name__}: {error}")
        await self._report(run, _terminated_status(container, started, code, "Completed" if code == 0 else "Error", ""))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def hand_offs(created: dict[str, float], ended: dict[str, float], since: float, until: float) -> list[float]:
    """Per study, as the API server saw it: the k-th of its trial pods to end frees the slot that
    its (PARALLEL+k)-th pod takes; the hand-off is the time between the two (ends in the window)."""
    by_study: dict[str, list[str]] = {}
    for key in created:
        match = re.fullmatch(r"(.+)-trial-(\d+)", key)
        if match:
            by_study.setdefault(match.group(1), []).append(key)
    result = []
    for pods in by_study.values():
        starts = sorted(created[p] for p in pods)
        ends = sorted(ended[p] for p in pods if p in ended)
        for k, end in enumerate(ends):
            if since <= end <= until:
                # a slot freed and no next pod yet when the window closed counts as waiting until then
                result.append(max(0.0, (starts[PARALLEL + k] if PARALLEL + k < len(starts) else until) - end))
    return result


def hand_off_breakdown(created: dict[str, float], ended: dict[str, float], since: float,
                       until: float) -> dict[str, Any]:
    """Where a hand-off's time goes, from the same API-server times: per hand-off, how many of its
    study's pods were created after its slot freed and before its own pod ("launches ahead": a
    reconcile launches one trial after another). Hand-offs with none ahead are the wake-up (pod end
    -> watch event -> a reconcile worker -> the pass's reads and first ask); the gap between a pod
    and the one created just before it, when that one was created after this slot freed, is one
    launch within a pass (an ask, the trial's writes, its Event and pod)."""
    by_study: dict[str, list[str]] = {}
    for key in created:
        match = re.fullmatch(r"(.+)-trial-(\d+)", key)
        if match:
            by_study.setdefault(match.group(1), []).append(key)
    ahead_of: dict[int, list[float]] = {}
    launch_gaps: list[float] = []
    for pods in by_study.values():
        starts = sorted(created[p] for p in pods)
        ends = sorted(ended[p] for p in pods if p in ended)
        for k, end in enumerate(ends):
            if not since <= end <= until or PARALLEL + k >= len(starts):
                continue
            start = starts[PARALLEL + k]
            between = [s for s in starts if end < s < start]
            ahead_of.setdefault(min(len(between), 3), []).append(max(0.0, start - end))
            if between:
                launch_gaps.append(start - max(between))
    rows = {f"{n}{'+' if n == 3 else ''}": {"hand_offs": len(v), "p50_s": round(_percentile(v, 0.5), 3),
                                            "p95_s": round(_percentile(v, 0.95), 3)}
            for n, v in sorted(ahead_of.items())}
    return {"by_launches_ahead": rows, "launch_gap_p50_s": round(_percentile(launch_gaps, 0.5), 3),
            "launch_gap_p95_s": round(_percentile(launch_gaps, 0.95), 3)}


def _proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat, idle and iowait left out)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds per part of the harness: the operator, the emulator, this process (the kubelet and
    the stand-in trials), the whole machine."""
    return {**{name: _proc_cpu_seconds(pid) for name, pid in pids.items()}, "machine": _machine_busy_seconds()}


def _proc_memory(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
        totals[name] = totals.get(name, 0.0) + value
        method = re.search(r'method="([^"]+)"', line)
        if name == "strata_optuna_storage_call_duration_seconds_count" and method:
            totals[f"storage:{method.group(1)}"] = value
    return totals


def _reachable(port: int, operator: subprocess.Popen) -> bool:
    if operator.poll() is not None:
        raise RuntimeError(f"the operator exited with {operator.returncode}")
    try:
        return bool(_metrics(port))
    except OSError:
        return False


def _operator_requests(stats: dict[str, Any]) -> int:
    return sum(n for agent, n in stats["requests"].items() if agent not in (KUBELET_AGENT, BENCH_AGENT))


def measure_size(studies: int, args: argparse.Namespace, server, workdir: Path) -> dict[str, Any]:
    from tests.e2e.conftest import secret
    from tests.services import free_port, wait_for

    database = f"ops{studies}_{int(time.time())}"
    url = server.create_database(database)
    cluster = RemoteCluster(workdir / f"api-{studies}").start()
    port = free_port()
    kubelet = StandinKubelet(cluster, workdir / f"kubelet-{studies}", storage_url=url,
                             trial_seconds=args.trial_seconds).start()
    operator = None
    try:
        crd = yaml.safe_load((ROOT / "crds" / "hpostudy.yaml").read_text())
        cluster.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        cluster.create(f"/api/v1/namespaces/{NAMESPACE}/secrets", secret("strata-db", {"url": url}))
        code = Path(args.operator_code).resolve() if args.operator_code else ROOT / "operator"
        env = {**os.environ, **cluster.env(), "PYTHONPATH": f"{code}:{ROOT / 'trainer_image'}",
               "STRATA_DATABASE_URL": url, "STRATA_DATABASE_SECRET": "strata-db/url", "STRATA_DATA_CHECK": "false",
               "STRATA_METRICS_PORT": str(port), "STRATA_HEALTH_URL": f"http://127.0.0.1:{free_port()}/healthz",
               "STRATA_TRAINER_IMAGE": "strata/trainer:bench"}
        log = open(workdir / f"operator-{studies}.log", "wb")
        operator = subprocess.Popen([sys.executable, "-m", "strata.kube"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=workdir)
        wait_for(lambda: _reachable(port, operator), timeout=60, interval=0.5)
        for i in range(studies):
            cluster.create(f"/apis/hpo.strata.dev/v1alpha1/namespaces/{NAMESPACE}/hpostudies",
                           study_manifest(f"s{i:03d}", 1))
        # Warm-up: every study has had its first wave of pods, and the first of them have ended.
        first_wave = studies * PARALLEL
        wait_for(lambda: sum("-trial-" in k for k in cluster.stats()["created"]) >= first_wave,
                 timeout=args.warmup_timeout, interval=1.0, message=f"{first_wave} first pods")
        time.sleep(args.trial_seconds)
        pid = operator.pid
        before, stats_before = _metrics(port), cluster.stats()
        pids = {"operator": pid, "emulator": cluster.process.pid, "kubelet": os.getpid()}
        cpu_before, started = _cpu_seconds(pids), time.time()
        rss_peak = 0
        while time.time() - started < args.window:
            time.sleep(1.0)
            rss_peak = max(rss_peak, _proc_memory(pid, "VmRSS"))
        cpu_after, until = _cpu_seconds(pids), time.time()
        after, stats_after = _metrics(port), cluster.stats()
        wall = until - started

        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)
        reconciles = delta("strata_reconcile_duration_seconds_count")
        waits = hand_offs(stats_after["created"], stats_after["ended"], started, until)
        sql = delta("strata_optuna_sql_statements_total") if "strata_optuna_sql_statements_total" in after else None
        row = {
            "studies": studies, "parallel": PARALLEL, "trial_seconds": args.trial_seconds, "window_s": round(wall, 1),
            "operator_cores": (cpu_after["operator"] - cpu_before["operator"]) / wall,
            # where the machine's cores went: PostgreSQL and the rest is the machine less the three
            "cores": {**{name: round((cpu_after[name] - cpu_before[name]) / wall, 2) for name in cpu_after},
                      "postgres_and_rest": round((cpu_after["machine"] - cpu_before["machine"]
                                                  - sum(cpu_after[n] - cpu_before[n] for n in pids)) / wall, 2),
                      "available": os.cpu_count()},
            "operator_rss_peak_mib": max(rss_peak, _proc_memory(pid, "VmHWM")) / 2**20,
            "reconciles_per_s": reconciles / wall,
            "reconcile_mean_s": delta("strata_reconcile_duration_seconds_sum") / max(1, reconciles),
            "api_requests_per_reconcile":
                (_operator_requests(stats_after) - _operator_requests(stats_before)) / max(1, reconciles),
            "storage_calls_per_reconcile": delta("strata_optuna_storage_call_duration_seconds_count") / max(1, reconciles),
            "sql_statements_per_reconcile": None if sql is None else sql / max(1, reconciles),
            "storage_calls_per_reconcile_by_method": {
                name.split(":", 1)[1]: round(delta(name) / max(1, reconciles), 2)
                for name in sorted(after) if name.startswith("storage:") and delta(name) > 0},
            "pods_created_in_window": sum(started <= t <= until for t in stats_after["created"].values()),
            "pods_ended_in_window": sum(started <= t <= until for t in stats_after["ended"].values()),
            "stand_in_errors": kubelet.errors[:5],
            "hand_offs": len(waits), "hand_off_p50_s": _percentile(waits, 0.5),
            "hand_off_p95_s": _percentile(waits, 0.95), "hand_off_p99_s": _percentile(waits, 0.99),
            "trials_per_s": len(waits) / wall, "status_bytes_max": max(stats_after["hpostudies"].values() or [0]),
            "hand_off_breakdown": hand_off_breakdown(stats_after["created"], stats_after["ended"], started, until),
        }
        print(f"  {studies:3d} studies: hand-off p50/p95/p99 {row['hand_off_p50_s']:.2f}/{row['hand_off_p95_s']:.2f}/"
              f"{row['hand_off_p99_s']:.2f} s ({len(waits)}), operator {row['operator_cores']:.2f} cores "
              f"{row['operator_rss_peak_mib']:.0f} MiB, {row['reconciles_per_s']:.1f} reconciles/s "
              f"({row['reconcile_mean_s'] * 1000:.0f} ms each), "
              f"{row['api_requests_per_reconcile']:.1f} API req and {row['storage_calls_per_reconcile']:.1f} "
              f"storage calls per reconcile, status <= {row['status_bytes_max']} B; cores {row['cores']}", flush=True)
        print(f"      hand-off by launches ahead in its pass: {row['hand_off_breakdown']}", flush=True)
        return row
    finally:
        if operator is not None and operator.poll() is None:
            os.killpg(operator.pid, signal.SIGTERM)
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(operator.pid, signal.SIGKILL)
        kubelet.stop()
        cluster.stop()
        server.drop_database(database)


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["# Scale: studies on one operator", "",
             f"Emulator + PostgreSQL + the operator process; perTrial, parallel {PARALLEL}, stand-in trials of "
             f"{results['trial_seconds']} s; {results['window']} s window. Operator code: {results['operator_code']}.", "",
             "| studies | hand-off p50 / p95 / p99 (s) | operator cores | peak RSS (MiB) | reconciles/s | "
             "API req / reconcile | storage calls / reconcile | trials/s | status max (B) | "
             "machine busy (cores): emulator / kubelet+trials / PostgreSQL+rest / all |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        c = r["cores"]
        lines.append(f"| {r['studies']} | {r['hand_off_p50_s']:.2f} / {r['hand_off_p95_s']:.2f} / {r['hand_off_p99_s']:.2f} | "
                     f"{r['operator_cores']:.2f} | {r['operator_rss_peak_mib']:.0f} | {r['reconciles_per_s']:.1f} | "
                     f"{r['api_requests_per_reconcile']:.1f} | {r['storage_calls_per_reconcile']:.1f} | "
                     f"{r['trials_per_s']:.1f} | {r['status_bytes_max']:,} | {c['emulator']:.2f} / {c['kubelet']:.2f} / "
                     f"{c['postgres_and_rest']:.2f} / {c['machine']:.2f} of {c['available']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 3 studies, 3 s trials (CI)")
    parser.add_argument("--sizes", default=None, help="study counts, comma-separated (default 1,10,50,100)")
    parser.add_argument("--trial-seconds", type=float, default=None, help="each stand-in trial's time (default 60)")
    parser.add_argument("--window", type=float, default=None, help="seconds measured per size (default 60)")
    parser.add_argument("--warmup-timeout", type=float, default=300)
    parser.add_argument("--operator-code", default=None, help="the operator/ folder of another checkout")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("1,3" if args.quick else "1,10,50,100")).split(",")]
    args.trial_seconds = args.trial_seconds or (3.0 if args.quick else 60.0)
    args.window = args.window or (12.0 if args.quick else 60.0)
    out = args.out or ROOT / "bench" / "results" / f"operator-scale-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    from tests.services import start_postgres, stop_postgres

    server = start_postgres()
    started = time.monotonic()
    try:
        rows = [measure_size(n, args, server, work) for n in sizes]
    finally:
        stop_postgres(server)
    results = {"quick": args.quick, "trial_seconds": args.trial_seconds, "window": args.window,
               "operator_code": args.operator_code or "this checkout", "rows": rows,
               "seconds": time.monotonic() - started}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "results.md")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
