"""Layer 2: a cgroup per worker with memory, pids and (if present) CPU limits.

CPU: every worker's cgroup gets the same weight (v1 cpu.shares, v2
cpu.weight) under its runner's cgroup, so under contention CFS splits the
CPU between the workers of a node equally, whatever number of threads or
processes each runs (a model spinning 30 threads gets what a one-thread
neighbour gets), and on top a quota (cpu_cores) caps each worker even on an
idle machine. The runner's cgroup, parent of its workers', weighs as many tasks
as it has workers (`_weigh_node`): under contention each model then gets about
what a process of its own would, whether its node hosts one model or hundreds
and whatever else runs on the host (a node weighing one task in all gave its
25 models together the CPU of one process of the host's).

The runner (as root) makes one cgroup per worker under its own cgroup, writes
the limits and gives the worker the `cgroup.procs` files to join; the worker
joins as its first act, before any submission code exists. cgroup v1 (one
hierarchy per controller, as on this project's machines) and v2 (one unified
hierarchy) are both supported. After the worker exits the runner reads the
OOM-kill counter (the precise cause of a MEMORY_LIMIT death), kills anything
left in the cgroup (children that left the process group) and removes it.

Host side: `WorkerCgroup.create`. Worker side: `join`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from secure_runner.runner.sandbox.policy import WorkerLimits

CPU_PERIOD_US = 100_000
# The same weight for every worker (the kernels' default values, written so that it never depends on them).
CPU_SHARES_V1 = 1024
CPU_WEIGHT_V2 = 100
# The kernels' largest weights: a node of more workers than these allow weighs only this much.
MAX_CPU_SHARES_V1 = 262_144
MAX_CPU_WEIGHT_V2 = 10_000
REQUIRED = ("memory", "pids")
OPTIONAL = ("cpu",)
RUNNER_DIR_PREFIX = "secure-runner."


class CgroupUnavailable(Exception):
    """This host gives the runner no writable memory and pids controllers."""


@dataclass(frozen=True)
class Hierarchy:
    version: int  # 1 or 2
    controllers: frozenset[str]
    own: Path  # the runner's own cgroup directory in this hierarchy


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of each cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if tail and tail[0] in ("cgroup", "cgroup2"):
            found.append((tail[0], fields[3], fields[4].replace("\\040", " "), set(tail[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hid, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name.removeprefix("name=")] = path
    return paths


def _under(mount_root: str, mount_point: str, path: str) -> Path | None:
    if not (path == mount_root or path.startswith(mount_root.rstrip("/") + "/")):
        return None  # our cgroup is outside what this mount shows
    return Path(mount_point) / path[len(mount_root):].lstrip("/")


@functools.cache
def hierarchies() -> tuple[Hierarchy, ...]:
    """The cgroup hierarchies that hold the controllers we use, v1 preferred per controller.

    Worked out once per process: on v2 the first worker's cgroup may move this process
    into a leaf of its own (`_enable_v2_controllers`), and the runner's cgroups stay
    under the cgroup it started in, not under that leaf.
    """
    own = _own_paths()
    mounts = _mounts()
    found: list[Hierarchy] = []
    taken: set[str] = set()
    for fstype, root, point, options in mounts:
        if fstype == "cgroup":
            names = frozenset(options & {*REQUIRED, *OPTIONAL} - taken)
            key = next(iter(names), None)
            where = _under(root, point, own.get(key, "")) if key else None
            if names and where is not None:
                found.append(Hierarchy(1, names, where))
                taken |= names
    for fstype, root, point, _options in mounts:
        if fstype == "cgroup2" and "" in own:
            where = _under(root, point, own[""])
            if where is None or not (where / "cgroup.controllers").exists():
                continue
            names = frozenset(set((where / "cgroup.controllers").read_text().split()) & {*REQUIRED, *OPTIONAL} - taken)
            if names:
                found.append(Hierarchy(2, names, where))
                taken |= names
    return tuple(found)


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _enable_v2_controllers(parent: Path, names: frozenset[str]) -> None:
    """Let `parent`'s children use `names`: the v2 rule forbids processes in a cgroup that delegates."""
    wanted = " ".join(f"+{n}" for n in sorted(names))
    try:
        _write(parent / "cgroup.subtree_control", wanted)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        # The runner itself sits in `parent`: move it to a leaf of its own, then delegate.
        leaf = parent / f"{RUNNER_DIR_PREFIX}{os.getpid()}.supervisor"
        leaf.mkdir(exist_ok=True)
        for pid in (parent / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, OSError):
                _write(leaf / "cgroup.procs", pid)
        _write(parent / "cgroup.subtree_control", wanted)


def _limits(hierarchy: Hierarchy, directory: Path, limits: WorkerLimits) -> None:
    names = hierarchy.controllers
    if hierarchy.version == 1:
        if "memory" in names:
            _write(directory / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (directory / "memory.memsw.limit_in_bytes").exists():
                _write(directory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        if "pids" in names:
            _write(directory / "pids.max", str(limits.pids))
        if "cpu" in names:
            _write(directory / "cpu.shares", str(CPU_SHARES_V1))
        if "cpu" in names and limits.cpu_cores > 0:
            _write(directory / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(directory / "cpu.cfs_quota_us", str(int(limits.cpu_cores * CPU_PERIOD_US)))
        return
    if "memory" in names:
        _write(directory / "memory.max", str(limits.memory_bytes))
        if (directory / "memory.swap.max").exists():
            _write(directory / "memory.swap.max", "0")
    if "pids" in names:
        _write(directory / "pids.max", str(limits.pids))
    if "cpu" in names:
        _write(directory / "cpu.weight", str(CPU_WEIGHT_V2))
    if "cpu" in names and limits.cpu_cores > 0:
        _write(directory / "cpu.max", f"{int(limits.cpu_cores * CPU_PERIOD_US)} {CPU_PERIOD_US}")


def _pids(directory: Path) -> list[int]:
    try:
        return [int(p) for p in (directory / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _kill_and_remove(directory: Path) -> None:
    for _ in range(50):
        pids = _pids(directory)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    with contextlib.suppress(FileNotFoundError):
        directory.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, only not ours to signal
        pass
    return True


def prune_stale(hierarchy: Hierarchy) -> None:
    """Remove cgroups left by runners that died without cleaning up (SIGKILL)."""
    for directory in hierarchy.own.glob(f"{RUNNER_DIR_PREFIX}*"):
        pid = directory.name.removeprefix(RUNNER_DIR_PREFIX).split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            for child in directory.iterdir():
                if child.is_dir():
                    _kill_and_remove(child)
            _kill_and_remove(directory)


def _make(hierarchy: Hierarchy, name: str, limits: WorkerLimits) -> Path:
    runner_dir = hierarchy.own / f"{RUNNER_DIR_PREFIX}{os.getpid()}"
    if not runner_dir.exists():
        prune_stale(hierarchy)
        if hierarchy.version == 2:
            _enable_v2_controllers(hierarchy.own, hierarchy.controllers)
        runner_dir.mkdir()
        if hierarchy.version == 2:
            _enable_v2_controllers(runner_dir, hierarchy.controllers)
    directory = runner_dir / name
    directory.mkdir()
    try:
        _limits(hierarchy, directory, limits)
    except OSError:
        directory.rmdir()
        raise
    _weigh_node(hierarchy, runner_dir)
    return directory


def _weigh_node(hierarchy: Hierarchy, runner_dir: Path) -> None:
    """Give the runner's cgroup the weight of as many tasks as it has workers (at least one)."""
    if "cpu" not in hierarchy.controllers:
        return
    with contextlib.suppress(OSError):  # a weight is a bonus, like the quota: never a reason to fail
        workers = max(1, sum(1 for child in runner_dir.iterdir() if child.is_dir()))
        if hierarchy.version == 1:
            _write(runner_dir / "cpu.shares", str(min(CPU_SHARES_V1 * workers, MAX_CPU_SHARES_V1)))
        else:
            _write(runner_dir / "cpu.weight", str(min(CPU_WEIGHT_V2 * workers, MAX_CPU_WEIGHT_V2)))


class WorkerCgroup:
    """One worker's cgroup in every hierarchy that holds a controller we use (host side)."""

    _serial = 0

    def __init__(self, directories: list[tuple[Hierarchy, Path]]) -> None:
        self.directories = directories
        self._oom_seen = 0

    @classmethod
    def create(cls, name: str, limits: WorkerLimits) -> WorkerCgroup:
        found = hierarchies()
        present = set().union(*(h.controllers for h in found)) if found else set()
        missing = [c for c in REQUIRED if c not in present]
        if missing:
            raise CgroupUnavailable(f"no {' or '.join(missing)} controller mounted for this process")
        cls._serial += 1
        made: list[tuple[Hierarchy, Path]] = []
        for hierarchy in found:
            try:
                made.append((hierarchy, _make(hierarchy, f"{name}.{cls._serial}", limits)))
            except OSError as exc:
                if hierarchy.controllers <= set(OPTIONAL):
                    continue  # a CPU quota is a bonus, not a layer
                for _hierarchy, directory in made:
                    _kill_and_remove(directory)
                raise CgroupUnavailable(f"cannot set up a cgroup: {exc}") from None
        return cls(made)

    @property
    def procs_files(self) -> list[str]:
        return [str(directory / "cgroup.procs") for _h, directory in self.directories]

    def contains(self, pid: int) -> bool:
        return all(pid in _pids(directory) for _h, directory in self.directories)

    def oom_kills(self) -> int:
        """OOM kills in this cgroup since the last call (v1 memory.oom_control, v2 memory.events)."""
        total = 0
        for hierarchy, directory in self.directories:
            if "memory" not in hierarchy.controllers:
                continue
            name = "memory.oom_control" if hierarchy.version == 1 else "memory.events"
            with contextlib.suppress(OSError):
                for line in (directory / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        total += int(value)
        new, self._oom_seen = total - self._oom_seen, total
        return new

    def remove(self) -> None:
        """Kill whatever is left in the cgroup and remove it."""
        for hierarchy, directory in self.directories:
            if hierarchy.version == 2 and (directory / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    _write(directory / "cgroup.kill", "1")
            _kill_and_remove(directory)
            _weigh_node(hierarchy, directory.parent)


def remove_runner_dirs() -> None:
    """At runner shutdown: remove this runner's (now empty) parent cgroups."""
    for hierarchy in hierarchies():
        with contextlib.suppress(OSError):
            (hierarchy.own / f"{RUNNER_DIR_PREFIX}{os.getpid()}").rmdir()


def join(procs_files: list[str], limits: WorkerLimits, error: str) -> str:
    """Worker side: move this process into its cgroups (before namespaces and the uid drop)."""
    if not procs_files:
        raise OSError(error or "the runner made no cgroup for this worker")
    for procs in procs_files:
        Path(procs).write_text(str(os.getpid()))
    return f"memory {limits.memory_bytes >> 20} MiB (no swap), pids {limits.pids}; joined {len(procs_files)} hierarchies"
