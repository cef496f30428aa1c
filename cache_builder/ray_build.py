"""Cache builds on a Ray cluster (`kdcache build --ray [ADDRESS]`): N teacher replicas fed shard groups by the build.

The build's own process (the driver) streams and tokenizes the corpus, cuts it into shard groups and hands each
group left to compute to a replica: a Ray actor holding one teacher, which computes the group's records
(`records.group_block`) and writes the shard's files straight into the output (`formats.writer.write_shard`,
temporary name then rename). Only the driver publishes, in shard order, so lock, resume, `--overwrite` and the
finished cache are those of a local build, shard for shard (content checksums included, given the same teacher
numerics: on CPU the same threads per teacher, `--ray-cpus`, as a CPU matmul's sums depend on its thread count).

Ray Core actors rather than Ray Data (`map_batches` over an actor pool), measured with the same replica code over
the same groups (benchmarks/RESULTS.md, 'Builder at scale'): neither is faster everywhere (Ray Data 13% ahead on a
loaded Xeon, Ray Core 14% ahead on a quiet AMD EPYC), so the choice follows what the build needs: a stream of
groups made in the driver (Ray Data wants a datasource it reads in its own tasks), at most two groups in flight per
replica (memory), each shard published by the driver in order, and a failed shard named by its path and error (Ray
Data fails the whole dataset, `max_errored_blocks = 0`). Faults: a replica whose process dies is restarted by Ray
(`max_restarts`, the teacher reloaded) and its unfinished calls run again (`max_task_retries`); a shard is written
under a temporary name and renamed, so a redone shard replaces nothing half-written, and the driver removes what
killed writers left before it finishes the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Callable

import torch

from cache_builder.errors import BuildError
from cache_builder.records import RecordSpec, group_block
from cache_builder.replicas import Finished, ShardWork
from cache_builder.settings import BuildSettings, VllmOptions
from cache_builder.teacher import Teacher
from formats.errors import KdError
from formats.manifest import ShardEntry
from formats.store import storage_environment
from formats.writer import write_shard

IN_FLIGHT = 2  # calls per replica at once: one uses the teacher while the other writes its shard or waits
TASK_RETRIES = 3  # a shard whose replica dies this many times more stops the build


class TeacherReplica:
    """One Ray actor: a teacher loaded once (on the replica's node: its GPUs, its threads), then one shard per call.

    Ray runs two calls at once (`max_concurrency`): the lock lets one use the teacher while the other writes its
    shard, so the teacher does not wait for the disk, as in a local build."""

    def __init__(self, make_teacher: Callable[[], Teacher], spec: RecordSpec, root: str, backend: str, threads: int):
        torch.set_num_threads(threads)
        self.spec, self.root, self.backend = spec, root, backend
        self.teacher = make_teacher()
        self.teacher.start()
        self.lock = threading.Lock()

    def run(self, group, path: str) -> ShardEntry:
        with self.lock:
            block = group_block(self.teacher, group, self.spec)
        return write_shard(self.root, path, group.split, block, self.spec.fields, self.backend)

    def pid(self) -> int:
        return os.getpid()


@dataclasses.dataclass
class RaySession:
    """This process's connection to a Ray cluster for one build."""

    owned: bool  # this build called ray.init (and so calls ray.shutdown; a cluster it started stops with it)

    @classmethod
    def connect(cls, address: str) -> "RaySession":
        """'local': start a one-machine cluster bound to 127.0.0.1; 'auto' or an address: join that cluster."""
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine unless asked for
        if ray.is_initialized():  # the caller's own connection (a notebook, a test): used as it is
            return cls(owned=False)
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            if address == "local":
                ray.init(_node_ip_address="127.0.0.1", **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise BuildError(f"--ray {address}: cannot start or reach a Ray cluster ({str(e).splitlines()[0]})") from None
        return cls(owned=True)

    def device(self, device: str) -> str:
        """'auto' -> "cuda" if the cluster has GPUs, else "cpu"; any other name is kept."""
        import ray

        if device != "auto":
            return device
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"

    def replicas(self, make_teacher: Callable[[], Teacher], spec: RecordSpec, s: BuildSettings,
                 progress: Callable[[int], None]) -> "RayReplicas":
        return RayReplicas(make_teacher, spec, s, progress)

    def close(self) -> None:
        import ray

        if self.owned:
            ray.shutdown()


def replica_gpus(s: BuildSettings) -> int:
    """GPUs one replica holds: none on CPU, one for a transformers teacher, tensor x pipeline stages for vLLM."""
    if s.device == "cpu":
        return 0
    if s.backend == "vllm":
        opts = VllmOptions.from_dict(s.vllm)
        return opts.tensor_parallel_size * opts.pipeline_parallel_size
    return 1


class RayReplicas:
    """`replicas.Replicas` on a Ray cluster: `s.ray_replicas` actors, each given at most IN_FLIGHT groups at once."""

    def __init__(self, make_teacher: Callable[[], Teacher], spec: RecordSpec, s: BuildSettings,
                 progress: Callable[[int], None]):
        import ray

        self.progress = progress
        gpus = replica_gpus(s)
        have = ray.cluster_resources()
        need_cpus, need_gpus = s.ray_replicas * s.ray_cpus, s.ray_replicas * gpus
        if have.get("CPU", 0) < need_cpus or have.get("GPU", 0) < need_gpus:
            print(f"kdcache build: {s.ray_replicas} replicas need {need_cpus} CPUs and {need_gpus} GPUs; the cluster "
                  f"has {have.get('CPU', 0):g} and {have.get('GPU', 0):g} now, so some wait for nodes to join",
                  file=sys.stderr)
        # A cluster's nodes did not start from this process: its storage options travel with the actors.
        env = storage_environment()
        actor = ray.remote(TeacherReplica).options(num_cpus=s.ray_cpus, num_gpus=gpus, max_restarts=-1,
                                                   max_task_retries=TASK_RETRIES, max_concurrency=IN_FLIGHT,
                                                   runtime_env={"env_vars": env} if env else None)
        self.actors = [actor.remote(make_teacher, spec, s.out, s.format, s.ray_cpus) for _ in range(s.ray_replicas)]
        self.inflight: dict = {}  # ObjectRef -> (work without its sequences, actor index)
        self.load = [0] * len(self.actors)
        # A replica gets groups once its teacher is loaded: replicas start at different times (a node joins late,
        # a process imports slowly), and a group queued on one still starting would hold up the shards after it.
        self.starting = {a.pid.remote(): i for i, a in enumerate(self.actors)}
        self.ready: set[int] = set()

    def submit(self, work: ShardWork) -> list[Finished]:
        finished = []
        while (i := self._free()) is None:
            finished += self._collect(block=True)
        ref = self.actors[i].run.remote(work.group, work.path)
        # Ray holds the group until the call succeeds (for retries); the driver keeps only what it publishes.
        self.inflight[ref] = (dataclasses.replace(work, group=dataclasses.replace(work.group, sequences=[])), i)
        self.load[i] += 1
        return finished + self._collect(block=False)

    def drain(self) -> list[Finished]:
        finished = []
        while self.inflight:
            finished += self._collect(block=True)
        return finished

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.inflight:  # a killed actor's calls fail once Ray has seen it die: then nothing writes any more
            ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=30)
        self.inflight.clear()
        self.starting.clear()
        self.actors = []

    def _free(self) -> int | None:
        """The ready replica with the fewest calls, if it has room for one more."""
        free = [i for i in sorted(self.ready) if self.load[i] < IN_FLIGHT]
        return min(free, key=self.load.__getitem__) if free else None

    def _collect(self, block: bool) -> list[Finished]:
        """Finished shards (and replicas that finished starting); with `block`, waits for at least one of either."""
        import ray
        from ray.exceptions import RayActorError

        refs = list(self.inflight) + list(self.starting)
        if not refs:
            return []
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        out = []
        for ref in ready:
            if ref in self.starting:
                i = self.starting.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as e:  # its teacher could not be loaded
                    raise BuildError(f"a teacher replica could not start ({_cause(e)})") from None
                self.ready.add(i)
                continue
            work, i = self.inflight.pop(ref)
            self.load[i] -= 1
            out.append((work, self._get(ref, work)))
            self.progress(work.group.tokens)
        return out

    @staticmethod
    def _get(ref, work: ShardWork) -> ShardEntry:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except RayTaskError as e:  # the replica raised: the build's own errors keep their one line
            cause = e.cause
            if isinstance(cause, KdError):
                raise cause from None
            raise BuildError(f"{work.path}: a replica failed on this shard ({type(cause).__name__}: "
                             f"{str(cause).splitlines()[0] if str(cause) else ''})") from None
        except RayActorError as e:
            raise BuildError(f"{work.path}: the replica computing this shard died, and it died again on each of "
                             f"{TASK_RETRIES} retries ({_cause(e)})") from None


def _cause(e: BaseException) -> str:
    """The last line of a Ray error's text that names an exception: where Ray puts the replica's own error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "Error:" in line or "Exception:" in line]
    return (named or lines or [type(e).__name__])[-1]
