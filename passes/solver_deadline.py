"""A wall-clock deadline for a pulp CBC solve.

CBC checks its time limit only between branch-and-bound nodes. Its first LP on a large
model can run far past the limit: the data-flow SymFold model of a 64-block SchNet on
V = 128 chunks (132,000 rows and columns) was still in that LP after 10 minutes with a
limit of 0.2 s. pulp waits on the CBC process without a timeout, so nothing else stops
it. Here the solve runs in a thread; if it is not done by the deadline, the CBC
processes started for it are killed and the caller falls back on the answer it already
had (the ILP's MIP start).

The CBC processes of one solve are found by their command line, which names the files
pulp writes into a directory given to that solve alone (``solver.tmpDir``). That needs
``/proc`` (Linux); elsewhere the solve is waited for, as pulp would. A solve not done by
the deadline is stopped as soon as its solver process can be found: the deadline may
pass while pulp is still writing the model.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Dict, List, Optional

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a solve past its deadline is looked for and stopped


def processes_naming(text: str) -> List[int]:
    """PIDs of this process's children whose command line contains ``text`` (Linux)."""
    me = os.getpid()
    needle = text.encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def solve_with_deadline(solve: Callable[[], Any], private_dir: str, deadline_s: float) -> Optional[Any]:
    """``solve()`` (a pulp solve whose solver writes its files into ``private_dir``), or
    None when it ran past ``deadline_s`` seconds and its solver processes were killed.
    An exception ``solve`` raises in time is raised here."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = solve()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="cbc-solve", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive() and not os.path.isdir("/proc"):
        log.warning("CBC ran past its %.3g s deadline; without /proc its process cannot be found to stop, so waiting for it", deadline_s)
        worker.join()
    killed = 0
    while worker.is_alive():  # the solver process may not have started yet: look until it has
        for pid in processes_naming(private_dir):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        worker.join(POLL_S)
    if killed:
        log.warning("CBC ran past its %.3g s deadline (its time limit is checked only between search nodes): stopped", deadline_s)
        return None
    if "error" in box:
        raise box["error"]
    return box.get("result")
