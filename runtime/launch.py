"""Local launcher: P worker processes on this machine, talking over loopback sockets.

Each worker joins a gloo (CPU) or NCCL (CUDA) process group through a TCP rendezvous on
127.0.0.1 with a timeout, so a dead rank makes the others fail with an error naming the
problem instead of hanging. Results come back through files (torch.save), which also
keeps a failed worker's traceback.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .malloc_tuning import tune_malloc_for_tensors

log = logging.getLogger(__name__)

# How workers start: "forkserver" (default where the platform has it) forks each from a
# server process that imported torch and the runtime once, so a run starts in about a
# second instead of P interpreters importing torch (~6 s at P = 2 on two cores, ~40 s at
# P = 4 on a slow host); "spawn" starts fresh interpreters. Either way workers get the
# function and arguments pickled, and this process's environment at launch (a change
# to a variable read at start-up, since the server started, makes that launch spawn).
START_METHOD_ENV = "JANUSPIPE_START_METHOD"
START_METHODS = ("forkserver", "spawn")
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "janus_compile.pipeline"]
# Variables read when a process starts or torch is imported (malloc, the dynamic loader,
# OpenMP, torch's and inductor's configuration): a forkserver child has the server's
# reading of them, whatever it is handed later. Changed since the server started, they
# make that launch spawn fresh interpreters instead.
STARTUP_VARIABLE_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_", "OMP_", "GOMP_", "KMP_", "MKL_", "TORCH", "PYTORCH_", "PYTHON")
_server_environment: Optional[dict] = None  # those variables when this process started the forkserver


def _startup_variables() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(STARTUP_VARIABLE_PREFIXES)}


def _forkserver_running() -> bool:
    from multiprocessing import forkserver

    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None) is not None


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its rank and traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device_type: str) -> str:
    """The process-group backend for tensors on ``device_type``: NCCL for CUDA, gloo for
    the CPU. It follows where the tensors live, not whether the machine has a GPU: CPU
    ranks on a GPU machine still need gloo (NCCL moves CUDA tensors only)."""
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise ValueError(f"no process-group backend for device type {device_type!r}; use 'cpu' or 'cuda'")


def local_device(device_type: str, rank: int) -> torch.device:
    """This process's device: the CPU, or its own GPU (``LOCAL_RANK`` under torchrun, else
    the rank modulo the GPUs this machine has)."""
    if device_type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but this process sees no CUDA device: use device='cpu'")
    index = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_process_group(rank: int, world_size: int, port: int, timeout_s: float, backend: str = "gloo") -> None:
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def torchrun_world() -> Optional[tuple]:
    """(rank, world size) when this process was started by torchrun (or any launcher that
    sets RANK, WORLD_SIZE and MASTER_ADDR for an ``env://`` rendezvous), else None."""
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def init_from_env(timeout_s: float, backend: str = "gloo") -> None:
    """Join the process group torchrun set up (no-op if this process already has one).
    A torchrun process is a training rank: its malloc is tuned as a spawned worker's."""
    if dist.is_initialized():
        return
    tune_malloc_for_tensors()
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))


def _save_report(report: dict, path: Path) -> None:
    """Write a worker's report whole or not at all: when one rank dies the others are
    terminated, possibly while writing theirs, and a half-written file must not hide the
    real failure from the parent."""
    tmp = path.with_suffix(".tmp")
    torch.save(report, tmp)
    os.replace(tmp, path)


def start_method() -> str:
    """The start method for workers: ``$JANUSPIPE_START_METHOD`` if set, else forkserver
    where available (Linux, macOS), else spawn."""
    asked = os.environ.get(START_METHOD_ENV)
    if asked:
        if asked not in START_METHODS:
            raise ValueError(f"{START_METHOD_ENV}={asked!r}: choose one of {list(START_METHODS)} (or unset it for the default)")
        method = asked
    else:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        global _server_environment
        if not _forkserver_running():
            # read when the server starts (this launch); later calls change nothing
            multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)
            _server_environment = _startup_variables()
        elif _server_environment is not None:
            now = _startup_variables()
            changed = sorted(k for k in now.keys() | _server_environment.keys() if now.get(k) != _server_environment.get(k))
            if changed:
                log.info("%s changed since the forkserver started: this launch spawns its workers", changed)
                return "spawn"
    return method


def _adopt_environment(env: Optional[dict]) -> None:
    """Make this worker's environment the parent's at launch. A forkserver child inherits
    the server's, taken when the server started; variables read later (a fault to
    inject, a cache directory, NCCL's settings) must still reach it. Those read at
    process start or import cannot: `start_method` spawns when they changed."""
    if env is None:
        return
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    os.environ.update(env)


def _worker(
    rank: int, world_size: int, port: int, timeout_s: float, fn: Callable, args: tuple, out_dir: str, backend: str = "gloo",
    env: Optional[dict] = None,
) -> None:
    _adopt_environment(env)
    torch.set_num_threads(1)
    tune_malloc_for_tensors()
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        if backend == "nccl":
            local_device("cuda", rank)
        init_process_group(rank, world_size, port, timeout_s, backend)
        result = fn(rank, world_size, *args)
        _save_report({"ok": True, "result": result}, path)
    except BaseException as exc:  # report every failure to the parent, with its traceback
        _save_report({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch_local(fn: Callable, world_size: int, args: tuple = (), timeout_s: float = 120.0, backend: str = "gloo") -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results.

    ``fn`` must be importable (a module-level function): workers are forked from a clean
    server process or spawned (`start_method`), never forked from this one.
    ``backend``: "gloo" (CPU tensors) or "nccl" (each process takes its own GPU).
    """
    with tempfile.TemporaryDirectory(prefix="januspipe_run_") as out_dir:
        port = free_port()
        ctx = mp.start_processes(
            _worker, args=(world_size, port, timeout_s, fn, args, out_dir, backend, dict(os.environ)), nprocs=world_size,
            join=False, start_method=start_method(),
        )
        failure = None
        try:
            while not ctx.join():
                pass
        except mp.ProcessRaisedException as exc:
            failure = exc
        except mp.ProcessExitedException as exc:
            failure = exc
        results, errors = [], []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                errors.append(f"rank {rank}: exited without a result (killed?)")
                results.append(None)
                continue
            data = torch.load(path, weights_only=False)
            if data["ok"]:
                results.append(data["result"])
            else:
                errors.append(f"rank {rank}: {data['error']}\n{data['traceback']}")
                results.append(None)
        if errors:
            raise WorkerError("pipeline worker(s) failed:\n" + "\n".join(errors))
        if failure is not None:
            # Every rank saved its result before tearing down its process group; a crash
            # after that (seen once as a C++ abort inside gloo's teardown) loses nothing.
            log.warning("a worker exited abnormally after every rank had reported its result (%s); results kept", failure)
        return results
