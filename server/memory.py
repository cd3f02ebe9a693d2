"""How much memory an inference worker may still use, and how much it has used (Linux).

Available memory is the smaller of the kernel's MemAvailable and what the worker's memory
cgroup (v2, or v1) still allows, counting reclaimable file cache as free as the kernel does:
a container's limit is what its OOM killer enforces, whatever the host has free. Limits nest:
the cgroup's own and every ancestor's that this process can see (a systemd slice, a pod) count,
the tightest wins. The peak of
this process's resident memory is read from /proc/self/status (VmHWM), and reset through
/proc/self/clear_refs so that one forward pass can be measured. Elsewhere (no /proc) nothing
is known and nothing is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")
MIB = 1 << 20


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def _field_kib(text: Optional[str], name: str) -> Optional[int]:
    """Bytes of a '<name>: <n> kB' line of a /proc file."""
    for line in (text or "").splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return None


def _stat(text: Optional[str], name: str) -> int:
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0


def _cgroup_dirs() -> list[tuple[Path, Path, str]]:
    """(directory, mount root, version) of this process's memory cgroup: its own path, else the
    mount's root (inside a cgroup namespace, a container's, the two are the same)."""
    found = []
    for line in (_read(PROC / "self/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            found += [(CGROUP / path.lstrip("/"), CGROUP, "v2"), (CGROUP, CGROUP, "v2")]
        elif "memory" in controllers.split(","):
            root = CGROUP / "memory"
            found += [(root / path.lstrip("/"), root, "v1"), (root, root, "v1")]
    return found


def _levels(directory: Path, root: Path) -> list[Path]:
    """`directory` and its ancestors up to the mount `root`, innermost first."""
    levels = [directory]
    while levels[-1] != root and root in levels[-1].parents:
        levels.append(levels[-1].parent)
    return levels


def _cgroup_memory() -> tuple[Optional[int], Optional[int]]:
    """(limit, free) bytes of this process's memory cgroup, the tightest over it and its
    ancestors; None where none of them sets a limit."""
    for directory, root, version in _cgroup_dirs():
        if not directory.is_dir():
            continue
        names = (("memory.max", "memory.current", "inactive_file") if version == "v2" else
                 ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
        limits, frees = [], []
        for level in _levels(directory, root):
            limit, usage = _read(level / names[0]), _read(level / names[1])
            if limit is None or usage is None or limit.strip() == "max" or int(limit) >= 1 << 60:
                continue  # no limit at this level (v2's root has no memory.max at all)
            cache = _stat(_read(level / "memory.stat"), names[2])
            limits.append(int(limit))
            frees.append(int(limit) - (int(usage) - cache))
        return (min(limits), min(frees)) if limits else (None, None)
    return None, None


def _smallest(*values: Optional[int]) -> Optional[int]:
    known = [v for v in values if v is not None]
    return max(min(known), 0) if known else None


def available_bytes() -> Optional[int]:
    """Memory this process could still allocate without the OOM killer, or None if unknown."""
    return _smallest(_field_kib(_read(PROC / "meminfo"), "MemAvailable"), _cgroup_memory()[1])


def capacity_bytes() -> Optional[int]:
    """All the memory there is for this process: the machine's, or its cgroup's limit."""
    return _smallest(_field_kib(_read(PROC / "meminfo"), "MemTotal"), _cgroup_memory()[0])


def resident_bytes() -> Optional[int]:
    """This process's resident memory now."""
    return _field_kib(_read(PROC / "self/status"), "VmRSS")


def peak_resident_bytes() -> Optional[int]:
    """This process's peak resident memory since it started or since `reset_peak()`."""
    return _field_kib(_read(PROC / "self/status"), "VmHWM")


def reset_peak() -> bool:
    """Reset the peak resident memory to the current one (Linux >= 4.0); False if not."""
    try:
        (PROC / "self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
