"""How much memory this process has: the machine's, or its memory cgroup's (v1 or v2) when that is lower."""

from __future__ import annotations


def _cgroups() -> list[tuple[str, str, str]]:
    """(directory, limit file, usage file) of each memory cgroup this process is in."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return []
    out = []
    for _, controllers, rel in lines:
        if controllers == "memory":  # cgroup v1
            out.append((f"/sys/fs/cgroup/memory{rel}", "memory.limit_in_bytes", "memory.usage_in_bytes"))
        elif controllers == "":  # cgroup v2
            out.append((f"/sys/fs/cgroup{rel}", "memory.max", "memory.current"))
    return out


def machine_memory() -> int:
    """The machine's total RAM, or the memory cgroup's limit when lower (a fixed figure, unlike free memory)."""
    import psutil

    total = psutil.virtual_memory().total
    for d, limit, _ in _cgroups():
        try:
            with open(f"{d}/{limit}") as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():  # "max": no limit
            total = min(total, int(value))
    return total


def free_memory() -> int:
    """Bytes this process may still allocate: free RAM, or less under its memory cgroup's limit (where file
    pages in the page cache count as free: the kernel drops them to make room)."""
    import psutil

    free = psutil.virtual_memory().available
    for d, limit, usage in _cgroups():
        try:
            with open(f"{d}/{limit}") as f, open(f"{d}/{usage}") as g, open(f"{d}/memory.stat") as h:
                stat = dict(line.split() for line in h)
                files = int(stat.get("active_file", 0)) + int(stat.get("inactive_file", 0))
                free = min(free, int(f.read()) - int(g.read()) + files)
        except (OSError, ValueError):  # not mounted there, or "max"
            continue
    return max(free, 0)
