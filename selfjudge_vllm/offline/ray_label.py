"""Labelling on Ray: each stage's missing shards run as Ray tasks, each task with its own
vLLM engine and resources (a GPU per task on a cluster, CPUs here), writing the same run
store on a shared filesystem, so resume, provenance and `selfjudge train` work unchanged.

Ray is an optional extra (`pip install -e ".[ray]"`); nothing else imports this module. On
a cluster, every node needs this package, the models and the run folder at the same paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from selfjudge_vllm.offline.label import STAGE_BY_NAME, LabelJob, Stage, run_stage_shards, stage_done

# Environment the tasks need as the driver has it (vLLM's settings, the offline hub).
FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_")
# Tasks pass only small descriptions (the shards themselves are files), so a local Ray needs
# no large object store (Ray's default reserves 30% of memory, which the engines need).
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


class RayTaskError(RuntimeError):
    """A Ray task of a stage failed; the shards it finished are kept for a rerun."""


def _stage_task(job: LabelJob, stage_name: str, indices: list[int]) -> None:
    run_stage_shards(job, STAGE_BY_NAME[stage_name], indices)


@dataclass
class RayExecutor:
    """address: a Ray cluster ("auto", "ray://host:10001") or None for a local Ray started
    for the run. workers: tasks per stage (None: as many as the cluster's resources fit)."""

    address: str | None = None
    workers: int | None = None
    task_cpus: float = 1.0
    task_gpus: float = 0.0
    _started: bool = field(default=False, init=False)

    def __enter__(self) -> "RayExecutor":
        import ray

        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        if not ray.is_initialized():
            local = {"object_store_memory": LOCAL_OBJECT_STORE_BYTES} if self.address is None else {}
            ray.init(address=self.address, runtime_env={"env_vars": env}, include_dashboard=False,
                     log_to_driver=True, **local)
            self._started = True
        if self.workers is None:
            resources = ray.cluster_resources()
            fits = [resources.get("CPU", 0) // self.task_cpus if self.task_cpus else float("inf"),
                    resources.get("GPU", 0) // self.task_gpus if self.task_gpus else float("inf")]
            self.workers = max(1, int(min(fits)))
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self._started:
            ray.shutdown()

    def run(self, job: LabelJob, stage: Stage, pending: list[int], progress) -> None:
        """The pending shards split over `workers` tasks; returns once every one is written
        (a failed task's error is raised here; its finished shards stay for a rerun)."""
        import ray

        task = ray.remote(num_cpus=self.task_cpus, num_gpus=self.task_gpus, max_retries=0)(_stage_task)
        groups = [pending[k :: self.workers] for k in range(min(self.workers, len(pending)))]
        refs = [task.remote(job, stage.name, group) for group in groups]

        def finished():
            left, running = list(pending), list(refs)
            while left:
                done, running = ray.wait(running, num_returns=len(running), timeout=2.0) if running else ([], [])
                try:
                    ray.get(done)
                except ray.exceptions.RayError as exc:
                    raise RayTaskError(f"a Ray task of stage {stage.name} failed ({exc}); the shards written so "
                                       "far are kept: run the same command again to continue") from exc
                for i in [i for i in left if stage_done(job.run, stage.name, i)]:
                    left.remove(i)
                    yield i
                if not running and left:
                    raise RuntimeError(f"Ray tasks of stage {stage.name} ended without shards {left}")

        for _ in progress(finished(), total=len(pending), desc=f"{stage.name} (ray, {len(groups)} tasks)",
                          unit="shard"):
            pass
