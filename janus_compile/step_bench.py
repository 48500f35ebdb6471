"""`januspipe step-bench`: one training step on one device, eager PyTorch against the explicit graph.

Stock `torch.compile` cannot train a conservative MLIP (its training step is a double
backward). Once JanusPipe has made the force graph explicit, the step is one
first-order joint graph, which runs as it is or through TorchInductor. For each model
this times three ways of computing the same loss and parameter gradients on the same
batch and device:

- ``eager``: the model's forward, forces by ``torch.autograd.grad(create_graph=True)``,
  then ``torch.autograd.grad`` of the loss (the double backward);
- ``joint``: JanusPipe's joint graph (`CompiledMLIP.train_step`);
- ``joint+inductor``: the same graph compiled by TorchInductor (option ``inductor``).

Each variant runs in a fresh process, so that its peak memory is its own: on CUDA the
allocator's peak (``torch.cuda.max_memory_allocated``) above the loaded model and
batch; on the CPU the growth of the resident high-water mark over the timed steps
(``VmHWM`` after a reset, Linux), with glibc told to return freed tensors to the system
(`CPU_MMAP_THRESHOLD`) so that resident memory follows live tensors. Step times are medians of ``steps`` timed steps after ``warmup`` untimed ones
(the first of which compiles). Every variant's loss and gradients are compared with
eager's (max relative difference), so a speed-up is only reported for the same numbers.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .arg_checks import check_device, check_output_folder

log = logging.getLogger(__name__)

VARIANTS = ("eager", "joint", "joint+inductor")


@dataclass
class StepBenchConfig:
    models: Sequence[str] = ("schnet", "painn", "nequip")
    hidden: int = 64
    layers: int = 4
    cutoff: float = 4.5
    atoms: int = 1000  # at least this many atoms per structure (an EMT-labelled Cu supercell)
    structures: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    steps: int = 5
    warmup: int = 2
    threads: int = 0  # torch threads on the CPU (0: torch's default)
    variants: Sequence[str] = VARIANTS
    seed: int = 0
    timeout_s: float = 3600.0
    rows: List[Dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
        check_device(self.device)
        for name in ("steps", "structures", "layers", "atoms", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} (--{name})")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads} (--threads)")
        if self.warmup < 1:
            raise ValueError("warmup must be >= 1 (the first step compiles)")


def _peak_reset(device: torch.device) -> Optional[float]:
    """Start a peak-memory window; returns the baseline in bytes (None if unmeasurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    from .bench import _status_kb

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024.0


def _peak_read(device: torch.device, baseline: Optional[float]) -> Optional[float]:
    """Bytes the window added at its peak."""
    if baseline is None:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device)) - baseline
    from .bench import _status_kb

    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024.0 - baseline


def _measure(cfg: StepBenchConfig, model_name: str, variant: str) -> Dict[str, Any]:
    """One variant of one model, in this (fresh) process."""
    from . import compile as compile_model
    from .bench import DTYPES, build_bench_model
    from .data import atoms_to_batch, large_structure
    from .losses import EnergyForceLoss

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    model = build_bench_model(model_name, cfg.hidden, cfg.layers, cfg.cutoff, cfg.dtype, cfg.seed).to(device)
    structures = [large_structure(cfg.atoms, seed=cfg.seed + k) for k in range(cfg.structures)]
    batch = atoms_to_batch(structures, cutoff=cfg.cutoff, dtype=dtype).to(device)
    loss_fn = EnergyForceLoss()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    capture_s = 0.0

    if variant == "eager":
        def step():
            loss = loss_fn(model(batch), batch)
            return loss.detach(), torch.autograd.grad(loss, params)
    else:
        t0 = time.perf_counter()
        compiled = compile_model(model, batch, loss=loss_fn, inductor=variant == "joint+inductor")
        capture_s = time.perf_counter() - t0

        def step():
            for p in params:
                p.grad = None
            loss, _ = compiled.train_step(batch, accumulate=False)
            return loss, tuple(p.grad for p in params)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    first_s = timed()  # capture-free here; compiles (inductor) on the first call
    for _ in range(cfg.warmup - 1):
        timed()
    baseline = _peak_reset(device)
    times = [timed() for _ in range(cfg.steps)]
    peak = _peak_read(device, baseline)
    loss, grads = step()
    return {
        "model": model_name,
        "variant": variant,
        "atoms": batch.num_atoms,
        "edges": batch.num_edges,
        "capture_s": capture_s,
        "first_step_s": first_s,
        "step_s": times,
        "step_s_median": statistics.median(times),
        "peak_bytes": peak,
        "loss": float(loss),
        # numpy, not tensors: torch would pass tensors through shared memory that is gone
        # once this process has exited
        "grads": {n: g.detach().cpu().numpy() for n, g in zip(names, grads)},
    }


def _child(conn: Any, cfg: StepBenchConfig, model_name: str, variant: str) -> None:
    try:
        conn.send(("ok", _measure(cfg, model_name, variant)))
    except BaseException as exc:  # reported by the parent, with the variant that failed
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


CPU_MMAP_THRESHOLD = "65536"
"""glibc serves allocations above this many bytes with mmap and unmaps them when freed, so
a CPU process's resident memory follows its live tensors (otherwise freed memory stays
resident in malloc's arenas and a peak measured after the warm-up sees nothing)."""


def _in_fresh_process(cfg: StepBenchConfig, model_name: str, variant: str) -> Dict[str, Any]:
    import os

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, cfg, model_name, variant))
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if not cfg.device.startswith("cuda") and saved is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = CPU_MMAP_THRESHOLD  # read by the child's C library at start
    try:
        proc.start()
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    child.close()
    if not parent.poll(cfg.timeout_s):
        proc.kill()
        proc.join()
        raise RuntimeError(f"step-bench: {model_name} {variant} gave no result within {cfg.timeout_s:g} s")
    status, payload = parent.recv()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"step-bench: {model_name} {variant} failed: {payload}")
    return payload


def _max_rel_diff(row: Dict[str, Any], ref: Dict[str, Any]) -> float:
    """Largest relative difference to the reference in the loss and any gradient."""
    worst = abs(row["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-300)
    for name, g in ref["grads"].items():
        scale = float(abs(g).max())
        if scale > 0:
            worst = max(worst, float(abs(row["grads"][name] - g).max()) / scale)
    return worst


def run_step_bench(cfg: StepBenchConfig, progress: bool = True) -> List[Dict[str, Any]]:
    """Every variant of every model; a variant that fails becomes a row with its ``error``
    (the full traceback is logged) and the others still run, so one failure loses nothing."""
    rows: List[Dict[str, Any]] = []
    for name in cfg.models:
        ref = None
        for variant in cfg.variants:
            t0 = time.perf_counter()
            try:
                row = _in_fresh_process(cfg, name, variant)
            except RuntimeError as exc:
                log.error("%s", exc)
                summary = str(exc).split("\n", 1)[0].replace("|", "/")  # one line, table-safe
                rows.append({"model": name, "variant": variant, "error": summary, "wall_s": time.perf_counter() - t0})
                if progress:
                    print(f"  [{name}] {variant}: FAILED ({summary})", flush=True)
                continue
            if variant == "eager":
                ref = row
            row["max_rel_diff_vs_eager"] = None if ref is None else _max_rel_diff(row, ref)
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            if progress:
                peak = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f} MiB"
                print(
                    f"  [{name}] {variant}: step {1e3 * row['step_s_median']:.1f} ms (first {row['first_step_s']:.1f} s), "
                    f"peak {peak}, max rel. diff vs eager {row['max_rel_diff_vs_eager']}",
                    flush=True,
                )
    for row in rows:
        row.pop("grads", None)
    cfg.rows = rows
    return rows


def markdown(rows: Sequence[Dict[str, Any]], cfg: StepBenchConfig) -> str:
    measured = [r for r in rows if "error" not in r]
    lines = [
        f"device {cfg.device}, {cfg.dtype}, {measured[0]['atoms'] if measured else '?'} atoms per batch; "
        f"median of {cfg.steps} steps after {cfg.warmup} warm-up",
        "",
        "| model | variant | atoms | edges | median step (ms) | speed-up vs eager | peak memory (MiB) | vs eager | capture + first step (s) | max rel. diff vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {r["model"]: r for r in rows if r["variant"] == "eager" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} |  |  |  |  |  |  |  |")
            continue
        e = eager.get(r["model"])
        speed = f"{e['step_s_median'] / r['step_s_median']:.2f}x" if e else "n/a"
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        rel = "n/a" if not e or not r["peak_bytes"] or not e["peak_bytes"] else f"{r['peak_bytes'] / e['peak_bytes']:.2f}"
        diff = "n/a" if r["max_rel_diff_vs_eager"] is None else f"{r['max_rel_diff_vs_eager']:.1e}"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['atoms']} | {r['edges']} | {1e3 * r['step_s_median']:.1f} | {speed} "
            f"| {peak} | {rel} | {r['capture_s']:.1f} + {r['first_step_s']:.1f} | {diff} |"
        )
    return "\n".join(lines)


def add_step_bench_args(p: Any) -> None:
    from .bench import add_reference_model_args

    add_reference_model_args(p, hidden=64)
    p.add_argument("--atoms", type=int, default=1000, help="atoms per structure (an EMT Cu supercell of at least this many)")
    p.add_argument("--structures", type=int, default=1, help="structures per batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", dest="json_path", default=None, help="also write the rows as JSON here")


def main(args: Any) -> int:
    check_output_folder(args.json_path, "--json")
    cfg = StepBenchConfig(
        models=args.models, hidden=args.hidden, layers=args.layers, cutoff=args.cutoff, atoms=args.atoms,
        structures=args.structures, dtype=args.dtype, device=args.device, steps=args.steps, warmup=args.warmup,
        threads=args.threads, variants=args.variants, seed=args.seed,
    )
    rows = run_step_bench(cfg)
    text = markdown(rows, cfg)
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(asdict(cfg), f, indent=1, default=str)
    failed = [f"{r['model']} {r['variant']}" for r in rows if "error" in r]
    if failed:
        log.error("step-bench: %d variant(s) failed: %s (tracebacks above)", len(failed), ", ".join(failed))
        return 1
    return 0
