"""Farm nodes on a Slurm cluster through dask-jobqueue (PBS: PBSCluster, same arguments).

Run this on the login node, where the compute nodes reach it, and leave it running: the
Dask scheduler lives in this process and Slurm jobs are its workers (Farm nodes).

    pip install dask-jobqueue           # beside Farm, in the environment the jobs use too
    farm cluster export-tls ~/farm-tls  # on the controller's machine; copy ~/farm-tls here
    python deploy/slurm/farm_slurm.py --jobs 4
    farm controller --scheduler tls://LOGIN-NODE:8786   # the address this prints

The exported files must be readable at the same path on the compute nodes (a shared
home), and only by you (export-tls writes them 0600). See docs/cluster.md, "An existing
Dask deployment".
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

#: Dask's HTTP side kept to its health check, as `farm controller` keeps its own.
HEALTH_ONLY = '["distributed.http.health"]'


def farm_security(tls: Path):
    """The scheduler (and this process, which speaks to it) holds the scheduler's certificate;
    the workers the nodes'. dask-jobqueue passes the worker files to each job as
    --tls-ca-file/--tls-cert/--tls-key."""
    from distributed import Security

    return Security(
        tls_ca_file=str(tls / "ca.pem"),
        tls_scheduler_cert=str(tls / "scheduler.pem"), tls_scheduler_key=str(tls / "scheduler.key"),
        tls_client_cert=str(tls / "scheduler.pem"), tls_client_key=str(tls / "scheduler.key"),
        tls_worker_cert=str(tls / "worker.pem"), tls_worker_key=str(tls / "worker.key"),
        require_encryption=True,
    )


def farm_cluster(tls: Path, *, port: int = 8786, cores: int = 8, memory: str = "16GB", walltime: str = "08:00:00",
                 queue: str | None = None, farm_config: str | None = None, cluster_class=None):
    """A SLURMCluster (or ``cluster_class``: PBSCluster, ...) whose scheduler runs Farm's role
    checks and whose workers are Farm nodes."""
    if cluster_class is None:
        from dask_jobqueue import SLURMCluster as cluster_class

    os.environ["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"] = HEALTH_ONLY
    prologue = [f"export DASK_DISTRIBUTED__WORKER__HTTP__ROUTES='{HEALTH_ONLY}'"]
    if farm_config:  # the nodes' settings (allow_commands, sandbox, path_map ...)
        prologue.append(f"export FARM_CONFIG={farm_config}")
    return cluster_class(
        cores=cores,  # one worker per job with `cores` threads: the node's slots
        processes=1,
        memory=memory,
        walltime=walltime,
        queue=queue,
        protocol="tls://",
        security=farm_security(tls),
        scheduler_options={"port": port, "preload": ["farm.daskroles"], "dashboard": False},
        worker_extra_args=["--preload", "farm.nodeservice", "--preload-nanny", "farm.daskroles",
                           "--memory-limit", "0", "--no-dashboard"],
        job_script_prologue=prologue,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Farm nodes as Slurm jobs, through dask-jobqueue.")
    parser.add_argument("--tls", default="~/farm-tls", help="the folder `farm cluster export-tls` wrote")
    parser.add_argument("--jobs", type=int, default=2, help="Slurm jobs, one Farm node each")
    parser.add_argument("--cores", type=int, default=8, help="cores per job (the node's slots)")
    parser.add_argument("--memory", default="16GB")
    parser.add_argument("--walltime", default="08:00:00")
    parser.add_argument("--queue", help="the Slurm partition")
    parser.add_argument("--port", type=int, default=8786)
    parser.add_argument("--farm-config", help="farm.yaml for the nodes, at a path the compute nodes see")
    parser.add_argument("--print-job-script", action="store_true", help="print one job's script and exit")
    args = parser.parse_args()
    cluster = farm_cluster(Path(args.tls).expanduser(), port=args.port, cores=args.cores, memory=args.memory,
                           walltime=args.walltime, queue=args.queue, farm_config=args.farm_config)
    if args.print_job_script:
        print(cluster.job_script())
        cluster.close()
        return
    cluster.scale(jobs=args.jobs)
    print(f"scheduler at {cluster.scheduler_address}: run `farm controller --scheduler "
          f"{cluster.scheduler_address}` (with a host name the controller reaches); Ctrl-C stops it", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
