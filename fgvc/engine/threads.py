"""CPU threads under `accelerate launch` without a GPU.

Without an `accelerate config` and without `--cpu`, `accelerate launch` starts its process with
`OMP_NUM_THREADS=1` (its default for `--num_cpu_threads_per_process`), so on a CPU-only machine the
main command would train on one core of many: slower, and a different floating-point order than
`python fgvc/train.py`, hence another result. When nobody asked for one thread (neither the
launcher's own environment nor its command line set it) and there is no GPU, each process gets
the cores it may run on divided by the processes on this machine.
"""

from __future__ import annotations

import os
from pathlib import Path

LAUNCHER_MARK = "ACCELERATE_DYNAMO_BACKEND"  # set by `accelerate launch` in every process it starts
THREADS_FLAG = "--num_cpu_threads_per_process"


def _parent(name: str) -> bytes | None:
    """/proc/<parent>/<name> (the launcher's environ or cmdline), None where /proc is not there."""
    try:
        return Path(f"/proc/{os.getppid()}/{name}").read_bytes()
    except OSError:
        return None


def launcher_forced_one_thread(env: dict[str, str], parent_env: bytes | None, parent_cmdline: bytes | None) -> bool:
    """True when `OMP_NUM_THREADS=1` came from accelerate's default and not from the user: this
    process was started by `accelerate launch`, which set 1, and the launcher itself had no
    OMP_NUM_THREADS in its environment and no --num_cpu_threads_per_process on its command line."""
    if LAUNCHER_MARK not in env or env.get("OMP_NUM_THREADS") != "1":
        return False
    if parent_env is None or parent_cmdline is None:  # cannot tell: leave the user's setting alone
        return False
    user_env = any(item.startswith(b"OMP_NUM_THREADS=") for item in parent_env.split(b"\0"))
    user_flag = any(arg.startswith(THREADS_FLAG.encode()) for arg in parent_cmdline.split(b"\0"))
    return not (user_env or user_flag)


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cores_per_process(env: dict[str, str]) -> int:
    """The cores this process may run on, shared evenly by the processes on this machine."""
    cores = available_cores()
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local))


def use_available_cores() -> int:
    """Undo accelerate's one-thread default on a CPU-only machine (see the module docstring);
    returns torch's thread count afterwards."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available() and launcher_forced_one_thread(env, _parent("environ"), _parent("cmdline")):
        threads = cores_per_process(env)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything started from here
        torch.set_num_threads(threads)
    return torch.get_num_threads()
