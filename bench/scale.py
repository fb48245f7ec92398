"""`make bench-scale`: a sweep of 4 trials per node on a simulated cluster, logging to MLflow on PostgreSQL.

    python bench/scale.py --nodes 8 [--trials-per-node 4] [--steps 3] [--kill] [--out scale.json]

The cluster: `ray.cluster_utils.Cluster`, every node a set of Ray processes on this machine. The head has
0 CPUs and a resource `head` that the trials' drivers ask for (so they, their Train controllers and the
per-run actors run there, as on a real cluster); each worker node has 1 CPU, a small object store and
one `fake_gpu`, which every trial's single Train worker asks for. Tracking: an `mlflow server` (2
workers, clusters/mlflow_server.sh) on a throwaway PostgreSQL cluster (`initdb` + `pg_ctl`, run as
`nobody` when this runs as root), artifacts on local disk through the server.

The sweep is sweeps/smoke.yaml on the tiny model, `--trials-per-node` x `--nodes` trials (one truncation,
one learning rate, a grid of seeds), `--steps` optimizer steps each; its concurrency comes from the
cluster (one trial per node). With `--kill`, the sweep driver is SIGKILLed once half of the trials have
finished and the sweep is continued with `--resume`.

Measured (bench/README.md): trials completed and errored (Tune's table), the most trials training at
once (overlap of the trials' per-step MLflow timestamps), metric rows lost or doubled (every trial's
train/loss, train/reward and eval/reward history in MLflow against the steps it ran), head memory (USS
of the head node's processes: Ray's daemons, the trials' drivers and controllers, the per-run actors),
the memory of the worker nodes, the machine's available memory at its lowest, and wall time. Run it under
`flock /tmp/alignprop-ray.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
WORKER = "ray::RayTrainWorker"
EXPERIMENT = "scale"
CHECKED = {"train/loss": "train", "train/reward": "train", "eval/reward": "eval"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=8, help="simulated worker nodes (one trial each at a time)")
    p.add_argument("--trials-per-node", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per trial")
    p.add_argument("--kill", action="store_true", help="SIGKILL the sweep driver half-way, then --resume")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the sweep (each part) may take")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- PostgreSQL and MLflow -------------------------------------------------------------------------------


def postgres_bin() -> Path:
    found = shutil.which("pg_ctl")
    candidates = [Path(found).parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))[::-1]
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    sys.exit("PostgreSQL's initdb and pg_ctl are needed (apt-get install postgresql)")


@contextlib.contextmanager
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a database `mlflow`; yields (uri, password)."""
    import psycopg

    bin_dir, home = postgres_bin(), Path(tempfile.mkdtemp(prefix="apl-scale-pg-", dir="/tmp"))
    as_owner: list[str] = []
    password, port = secrets.token_hex(16), free_port()
    (home / "password").write_text(password)
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        nobody = pwd.getpwnam("nobody")
        for path in (home, home / "password"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        as_owner = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--"]
    data, pg_ctl = home / "data", str(bin_dir / "pg_ctl")
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='' -c fsync=off"
    options += " -c max_connections=300"
    run = lambda *c: subprocess.run([*as_owner, *map(str, c)], check=True, capture_output=True, timeout=120)  # noqa: E731
    try:
        run(
            bin_dir / "initdb",
            "-D",
            data,
            "-U",
            "mlflow",
            f"--pwfile={home / 'password'}",
            "--auth=scram-sha-256",
        )
        run(pg_ctl, "-D", data, "-l", home / "postgres.log", "-o", options, "-w", "-t", 60, "start")
        with psycopg.connect(
            host="127.0.0.1", port=port, user="mlflow", password=password, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute('CREATE DATABASE "mlflow"')
        yield f"postgresql+psycopg://mlflow@127.0.0.1:{port}/mlflow", password
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], timeout=60)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(store: str, password: str, workdir: Path):
    """clusters/mlflow_server.sh on a free loopback port, 2 workers; yields the http:// URI and its pids."""
    port, state = free_port(), workdir / "mlflow-server"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env |= {"PGPASSWORD": password, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    script = ROOT / "clusters" / "mlflow_server.sh"
    flags = ["--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--backend-store-uri", store]
    flags += ["--artifacts-destination", str(workdir / "artifacts"), "--serve-artifacts"]
    subprocess.run(["bash", script, "start", state, *flags], cwd=workdir, env=env, check=True, timeout=300)
    try:
        yield f"http://127.0.0.1:{port}", int((state / "server.pid").read_text())
    finally:
        subprocess.run(["bash", script, "stop", state], env=env, timeout=120)


# --- the cluster ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def simulated_cluster(nodes: int):
    """A head (0 CPUs, resource `head`) and `nodes` worker nodes (1 CPU, 1 fake_gpu); yields it."""
    from ray._private import utils
    from ray.cluster_utils import Cluster

    recorded = utils.read_ray_address()  # Cluster records its address as the `ray start` cluster's
    head = {"num_cpus": 0, "resources": {"head": 1000}, "object_store_memory": 200 * MIB}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1, resources={"fake_gpu": 1}, object_store_memory=80 * MIB)
        cluster.wait_for_nodes(timeout=300)
        yield cluster
    finally:
        cluster.shutdown()
        if recorded:
            utils.write_ray_address(recorded)
        else:
            with contextlib.suppress(OSError):
                os.remove(utils.get_ray_address_file(None))


def head_processes(cluster) -> list[psutil.Process]:
    """The head node's Ray processes and every process its raylet started (drivers, controllers, actors)."""
    found = []
    for infos in cluster.head_node.all_processes.values():
        for info in infos:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(info.process.pid)
                found += [process, *process.children(recursive=True)]
    return found


def worker_node_processes(cluster) -> list[psutil.Process]:
    found = []
    for node in cluster.worker_nodes:
        for infos in node.all_processes.values():
            for info in infos:
                with contextlib.suppress(psutil.Error):
                    process = psutil.Process(info.process.pid)
                    found += [process, *process.children(recursive=True)]
    return found


def uss_mib(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in {p.pid: p for p in processes}.values():
        with contextlib.suppress(psutil.Error):
            total += process.memory_full_info().uss / MIB
    return total


class Sampler(threading.Thread):
    """Every 2 s: head and worker-node memory (USS), Train workers alive, the machine's available memory."""

    def __init__(self, cluster, extra_head_pids: list[int]):
        super().__init__(daemon=True)
        self.cluster, self.extra = cluster, list(extra_head_pids)  # the MLflow server, the sweep drivers
        self.stop = threading.Event()
        self.peak = {"head_mib": 0.0, "worker_nodes_mib": 0.0, "train_workers": 0}
        self.lowest_available_mib = psutil.virtual_memory().available / MIB
        self.biggest: dict[str, float] = {}  # process kind -> largest USS seen (MiB)

    def run(self) -> None:
        while not self.stop.wait(2.0):
            with contextlib.suppress(Exception):
                self._sample()

    def _sample(self) -> None:
        head = head_processes(self.cluster)
        for pid in self.extra:
            with contextlib.suppress(psutil.Error):
                head += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        workers = worker_node_processes(self.cluster)
        trains = [p for p in workers if _title(p).startswith(WORKER)]
        self.peak["head_mib"] = max(self.peak["head_mib"], uss_mib(head))
        self.peak["worker_nodes_mib"] = max(self.peak["worker_nodes_mib"], uss_mib(workers))
        self.peak["train_workers"] = max(self.peak["train_workers"], len(trains))
        self.lowest_available_mib = min(self.lowest_available_mib, psutil.virtual_memory().available / MIB)
        for process in head + trains:
            kind = _title(process).split()[0].split(".")[0] or process.name()
            with contextlib.suppress(psutil.Error):
                self.biggest[kind] = max(self.biggest.get(kind, 0.0), process.memory_full_info().uss / MIB)


def _title(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        command = process.cmdline()
        return command[0] if command else ""
    return ""


# --- the sweep -----------------------------------------------------------------------------------------


def sweep_command(workdir: Path, uri: str, trials: int, steps: int, *extra: str) -> list[str]:
    sets = {
        "name": EXPERIMENT,
        "base.tracking.experiment": EXPERIMENT,
        "tracking.uri": uri,
        "storage.path": workdir / "runs",
        "space.truncation": "{grid: [full]}",
        "space.train.lr": "{grid: [1.0e-2]}",
        "space.train.seed": "{grid: [" + ", ".join(map(str, range(trials))) + "]}",
        "tune.resources": "{CPU: 0, head: 0.001}",  # the trials' drivers on the head
        "scaling.resources_per_worker": "{CPU: 1, fake_gpu: 1}",
        "train.steps": steps,
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "train.batch_size": 1,
        "sampling.steps": 2,
        "model.resolution": 32,
        "stop.collapse": "null",
    }
    command = [sys.executable, "-m", "alignprop_ray.cli", "sweep", str(ROOT / "sweeps" / "smoke.yaml")]
    return command + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")] + list(extra)


def finished_runs(uri: str) -> int:
    from mlflow import MlflowClient

    with contextlib.suppress(Exception):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment:
            query = "tags.`mlflow.parentRunId` != '' and attributes.status = 'FINISHED'"
            return len(client.search_runs([experiment.experiment_id], query, max_results=1000))
    return 0


def run_sweep(
    command: list[str],
    workdir: Path,
    env: dict,
    timeout: float,
    kill_after: int | None,
    uri: str,
    head_pids: list[int],
):
    """Run the sweep (its pid joins `head_pids`: a sweep driver runs on the head); with `kill_after`,
    SIGKILL it once that many trials have finished. (exit status, output)"""
    log_path = workdir / f"sweep-{int(time.time())}.log"
    with open(log_path, "w") as log:
        sweep = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    head_pids.append(sweep.pid)
    deadline = time.monotonic() + timeout
    try:
        while sweep.poll() is None and time.monotonic() < deadline:
            if kill_after is not None and finished_runs(uri) >= kill_after:
                sweep.send_signal(signal.SIGKILL)
                print(f"[scale] sweep driver killed after {kill_after} trials finished", flush=True)
            time.sleep(2)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        sweep.wait()
    return sweep.returncode, log_path.read_text()


# --- counting ------------------------------------------------------------------------------------------


def mlflow_counts(uri: str, steps: int) -> dict:
    """Per trial run: metric rows missing or repeated against the steps it ran; the most at once."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` != ''", max_results=1000)
    lost = doubled = 0
    windows, statuses = [], {}
    expected = {"train": list(range(1, steps + 1)), "eval": [0, steps]}
    for run in runs:
        statuses[run.info.status] = statuses.get(run.info.status, 0) + 1
        for key, kind in CHECKED.items():
            history = client.get_metric_history(run.info.run_id, key)
            seen = [m.step for m in history]
            lost += len(set(expected[kind]) - set(seen))
            doubled += len(seen) - len(set(seen))
            if key == "train/loss" and history:
                windows.append((min(m.timestamp for m in history), max(m.timestamp for m in history)))
    return {
        "child_runs": len(runs),
        "run_statuses": statuses,
        "metric_rows_lost": lost,
        "metric_rows_doubled": doubled,
        "peak_training_at_once": most_at_once(windows),
    }


def most_at_once(windows: list[tuple[int, int]]) -> int:
    edges = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows])
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


def table_counts(output: str) -> dict:
    """Trials completed and errored, from the table the sweep prints at its end."""
    if "\ntrial " not in output:
        return {"completed": 0, "errors": None}
    rows = []
    for line in output[output.index("\ntrial ") + 1 :].splitlines()[1:]:
        if not line.strip():
            break
        rows.append(line.rstrip())
    return {
        "completed": sum(r.endswith(" completed") for r in rows),
        "errors": sum(r.endswith(" error") for r in rows),
    }


def measure(args: argparse.Namespace) -> dict:
    trials = args.nodes * args.trials_per_node
    with tempfile.TemporaryDirectory(prefix="apl-scale-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        with postgres() as (store, password), mlflow_server(store, password, workdir) as (uri, server_pid):
            started = time.monotonic()
            with simulated_cluster(args.nodes) as cluster:
                up_s = time.monotonic() - started
                env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
                env |= {"RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
                sampler = Sampler(cluster, [server_pid])
                sampler.start()
                command = sweep_command(workdir, uri, trials, args.steps)
                began = time.monotonic()
                kill_after = trials // 2 if args.kill else None
                code, output = run_sweep(command, workdir, env, args.timeout, kill_after, uri, sampler.extra)
                killed = args.kill and code == -signal.SIGKILL
                if killed:
                    resume = [*command, "--resume"]
                    code, output = run_sweep(resume, workdir, env, args.timeout, None, uri, sampler.extra)
                wall_s = time.monotonic() - began
                sampler.stop.set()
                sampler.join()
            counts = mlflow_counts(uri, args.steps)
        if code != 0:
            print(output[-6000:], file=sys.stderr)
    return {
        "nodes": args.nodes,
        "trials": trials,
        "steps": args.steps,
        "driver_killed_and_resumed": bool(args.kill and killed),
        "exit_code": code,
        **table_counts(output),
        **counts,
        "peak_train_workers_alive": sampler.peak["train_workers"],
        "peak_head_uss_mib": round(sampler.peak["head_mib"]),
        "peak_worker_nodes_uss_mib": round(sampler.peak["worker_nodes_mib"]),
        "lowest_available_mib": round(sampler.lowest_available_mib),
        "largest_process_uss_mib": {k: round(v) for k, v in sorted(sampler.biggest.items())},
        "cluster_start_s": round(up_s, 1),
        "sweep_wall_s": round(wall_s, 1),
        "machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB",
    }


def main() -> None:
    args = parse_args()
    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
