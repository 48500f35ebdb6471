"""`januspipe bench`: WaveK against the 1F1B, Hanayo and GPipe baselines, side by side.

Two parts, both written to one JSON file and printed as markdown tables:

- **real runs** (`run_real`): for every micro-batch count M and every schedule, a
  `PipelineTrainer` on P local gloo processes runs timed training steps with ``lr=0``
  (every compute, send, receive and the gradient all-reduce run; only the optimizer
  update is skipped). Schedules alternate round-robin over ``repeats`` rounds, so a
  change in machine load spreads over all of them instead of skewing one. Reported per
  schedule: median / min / max step time, structures/s and atoms/s, the simulator's
  predicted step time for the very programs that ran (re-simulated with one shared
  calibration, see `_shared_simulation`; the trainer's own ``programs.meta["simulated"]``
  is kept too) and its relative error, the simulated bubble fraction and pipeline
  efficiency, compute time calibrated vs traced, tensors received per rank, the
  partition's estimated memory per rank and each worker's measured peak memory; per M,
  the throughput ratios wavek/1f1b and wavek/hanayo (and wavek/gpipe).
- **simulated runs** (`run_simulation`): per-node costs calibrated on this machine, the
  real model DAG partitioned (SymFold for wavek/gpipe/hanayo, the unfolded partition for
  1f1b) and every schedule simulated at P ∈ {4, 8, 16, 32}, M ∈ {P, 2P, 4P}. A model
  with too few units for P is rebuilt deeper (more interaction blocks) and the table
  says so.

Micro-batches have a fixed size (``mb_structures`` structures each), so a step with M
micro-batches trains on M × ``mb_structures`` structures.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

log = logging.getLogger(__name__)

SCHEDULES = ("1f1b", "hanayo", "wavek", "gpipe")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
from .arg_checks import check_output_folder
from .options import AUTO_CHUNKS, JanusOptions, chunks_arg
from .memory_budget import AUTO_MEMORY_FRACTION, optimizer_state_bytes, param_bytes

EQUAL_MEMORY = "wavek@1f1b-mem"
"""WaveK limited to the peak memory 1F1B uses (a second WaveK row of the bench)."""
COUNT_CAP = "wavek@count-P"
"""WaveK held to P micro-batches in flight per rank whatever the memory (``memory_cap_gb=None``;
the plain ``wavek`` row has the default ``'auto'``, a share of the device's memory)."""

PAPER_RATIOS = {"wavek/1f1b": 1.51, "wavek/hanayo": 1.45}  # 32 GPUs, averaged (abstract)
SIM_BASELINE_SPLITS = ("best", "trainer")  # BenchConfig.sim_baseline_splits
SIM_UNITS_PER_CHUNK = 3.0  # a simulated model gets at least this many (module) units per chunk
MAX_SIM_LAYERS = 64


@dataclass
class BenchConfig:
    model: str = "schnet"
    hidden: int = 32
    layers: int = 4
    cutoff: float = 4.5
    dtype: str = "float32"
    seed: int = 0
    stages: int = 2
    chunks: Union[int, str] = "auto"  # K for wavek and gpipe ("auto": the fastest of 1, 2, 4 simulated); hanayo 2, 1f1b 1
    microbatches: List[int] = field(default_factory=lambda: [4])
    schedules: List[str] = field(default_factory=lambda: list(SCHEDULES))
    repeats: int = 3
    steps: int = 3  # timed steps per run
    warmup: int = 3  # untimed steps per run: the heap grows (page faults) over the first few
    mb_structures: Optional[int] = None  # structures per micro-batch (default 2, or 1 with large)
    atoms: int = 16  # atoms per EMT structure
    large: Optional[int] = None  # >= this many atoms per structure (large_structure)
    threads: int = 1  # torch threads in the parent (calibration); workers use 1
    real: bool = True
    simulate: bool = False
    sim_models: List[str] = field(default_factory=lambda: ["schnet", "painn", "nequip"])
    sim_stages: List[int] = field(default_factory=lambda: [4, 8, 16, 32])
    sim_factors: List[int] = field(default_factory=lambda: [1, 2, 4])  # M = factor × P
    sim_chunks: List[int] = field(default_factory=lambda: [1, 2])  # K tried for wavek (best kept)
    # ILP time limit per simulated split: the trainer's default, so the study prices the
    # splits users get (a lower one makes a P = 32 study hours shorter, a little less balanced)
    sim_ilp_time_s: float = JanusOptions.ilp_time_limit_s
    # The splits the simulated baselines choose from. "best": Hanayo and GPipe each keep the
    # faster of the trainer's split and one solved with transfers charged once per cut edge
    # (`transfer_charge="once"`), for each K; which charge splits best varies by model and
    # P, and a baseline should not lose on the split. WaveK keeps the trainer's split, so
    # its ratios are what the trainer gets. "trainer": every schedule on the trainer's.
    sim_baseline_splits: str = "best"
    # ILP time limit per solve when the real runs' trainers are planned (None: the trainer's
    # default, `ilp_time_limit_s`); a lower one trades some balance for planning time
    ilp_time_s: Optional[float] = None
    # Trainers reuse an earlier trainer's joint graph, calibration and partitions where
    # only the schedule differs (`PipelineTrainer(plan_like=...)`): the same run at the previous
    # M; GPipe and WaveK at P in flight the WaveK of the same M. The others reuse the joint
    # graph and calibration of the first trainer built at that M. Off: each plans alone.
    reuse_plans: bool = True
    # Also run WaveK at 1F1B's memory (EQUAL_MEMORY): its budget is the peak 1F1B itself
    # uses on its worst rank, replayed by passes/memory.py, in-flight caps up to min(M, 3P) searched.
    # "wavek" itself keeps its default limit, memory_cap_gb="auto" (a share of the device's
    # memory; in the simulation, of sim_memory_gb per rank).
    equal_memory: bool = True
    # Also run WaveK held to P micro-batches in flight whatever the memory (COUNT_CAP)
    count_cap: bool = True
    sim_memory_gb: float = 80.0  # memory of one simulated device (H100-class)
    # After the timed runs, one more step per schedule with every tensor allocation
    # recorded (runtime/memory_probe.py): the measured peak the memory replay predicts
    allocator_probe: bool = True
    # Processes running the same split graphs while the shared timing times them (CPU), as
    # the other ranks of a real run load the host's memory system beside each rank
    # (`passes/group_timing.py`). None: P - 1, what a local run has; 0: time alone.
    timing_contenders: Optional[int] = None
    # per-op cost models timed on another device (`januspipe calibrate --out FILE`); None:
    # the simulation calibrates on this machine
    sim_costs: Optional[str] = None
    sim_bandwidth_gbs: float = 25.0
    sim_latency_us: float = 20.0
    timeout_s: float = 600.0
    dump_dir: Optional[str] = None  # per run: <dump_dir>/<schedule>-M<M>/ (schedules, Gantt charts, traces)

    def __post_init__(self) -> None:
        if self.mb_structures is None:
            self.mb_structures = 1 if self.large else 2
        bad = [s for s in self.schedules if s not in SCHEDULES]
        if bad:
            raise ValueError(f"unknown schedule(s) {bad}; choose from {list(SCHEDULES)}")
        if self.chunks != AUTO_CHUNKS and not (isinstance(self.chunks, int) and self.chunks >= 1):
            raise ValueError(f"chunks must be a positive integer or {AUTO_CHUNKS!r}, got {self.chunks!r}")
        if self.ilp_time_s is not None and not self.ilp_time_s > 0:
            raise ValueError(f"ilp_time_s must be positive, got {self.ilp_time_s}")
        if not self.sim_ilp_time_s > 0:
            raise ValueError(f"sim_ilp_time_s must be positive, got {self.sim_ilp_time_s} (--sim-ilp-time: seconds per split, e.g. 2 or 30)")
        if self.sim_baseline_splits not in SIM_BASELINE_SPLITS:
            raise ValueError(
                f"sim_baseline_splits must be one of {SIM_BASELINE_SPLITS}, got {self.sim_baseline_splits!r} (--sim-baseline-splits)"
            )
        if not self.sim_memory_gb > 0:
            raise ValueError(f"sim_memory_gb must be positive, got {self.sim_memory_gb}")
        for name in ("stages", "repeats", "steps", "mb_structures", "atoms", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.timing_contenders is not None and self.timing_contenders < 0:
            raise ValueError(f"timing_contenders must be >= 0 (or None for P - 1), got {self.timing_contenders} (--timing-contenders)")
        if not self.microbatches or min(self.microbatches) < 1:
            raise ValueError(f"microbatches must be positive integers, got {self.microbatches}")
        if self.stages < 2 and self.real:
            raise ValueError("a pipeline benchmark needs stages >= 2")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.real and not self.simulate:
            raise ValueError("nothing to run: --no-real skips the real runs and --simulate was not given; add --simulate, or drop --no-real")
        if self.simulate:
            for name, flag, least in (("sim_stages", "--sim-stages", 2), ("sim_factors", "--sim-factors", 1), ("sim_chunks", "--sim-chunks", 1)):
                values = list(getattr(self, name))
                if not values or min(values) < least:
                    raise ValueError(f"{name} must be integers >= {least}, got {values} ({flag})")
            from .models import MODEL_REGISTRY

            unknown = [m for m in self.sim_models if m not in MODEL_REGISTRY]
            if not self.sim_models or unknown:
                raise ValueError(f"sim_models must name models from {sorted(MODEL_REGISTRY)}, got {list(self.sim_models)} (--sim-models)")
            if not self.sim_bandwidth_gbs > 0:
                raise ValueError(f"sim_bandwidth_gbs must be positive, got {self.sim_bandwidth_gbs} (--sim-bandwidth, GB/s)")
            if not self.sim_latency_us >= 0:
                raise ValueError(f"sim_latency_us must be >= 0, got {self.sim_latency_us} (--sim-latency-us)")

    @property
    def runs(self) -> List[str]:
        """What the bench times: the schedules, plus WaveK at 1F1B's memory and at P in
        flight when asked for."""
        extra = [EQUAL_MEMORY] if self.equal_memory and {"wavek", "1f1b"} <= set(self.schedules) else []
        extra += [COUNT_CAP] if self.count_cap and "wavek" in self.schedules else []
        return list(self.schedules) + extra


# ---------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------


def build_bench_model(name: str, hidden: int, layers: int, cutoff: float, dtype: str, seed: int) -> torch.nn.Module:
    from .models import build_model

    kwargs: Dict[str, Any] = {"cutoff": cutoff, "num_interactions": layers}
    if name in ("schnet", "painn"):
        kwargs["hidden"] = hidden
    torch.manual_seed(seed)
    return build_model(name, **kwargs).to(DTYPES[dtype]).train()


def add_reference_model_args(p: Any, hidden: int) -> None:
    """``--models`` and the sizes `build_bench_model` takes, for the commands that run
    several reference models (step-bench, calibrate)."""
    p.add_argument("--models", nargs="+", default=["schnet", "painn", "nequip"], choices=["schnet", "painn", "nequip"])
    p.add_argument("--hidden", type=int, default=hidden, help="feature width (schnet, painn)")
    p.add_argument("--layers", type=int, default=4, help="interaction blocks")
    p.add_argument("--cutoff", type=float, default=4.5, help="neighbour cutoff in Å")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)


def bench_structures(cfg: BenchConfig, count: int) -> list:
    """``count`` labelled structures: EMT fcc (Cu, Al, CuAl) of ``cfg.atoms`` atoms each, or
    ``large_structure(cfg.large)`` supercells (Cu, different seeds)."""
    from .data import emt_dataset, large_structure

    if cfg.large:
        return [large_structure(cfg.large, seed=cfg.seed + k) for k in range(count)]
    return emt_dataset("cu-al", num_structures=count, seed=cfg.seed, size=(cfg.atoms, cfg.atoms))


def _batch(cfg: BenchConfig, structures: Sequence) -> Any:
    from .data import atoms_to_batch

    return atoms_to_batch(list(structures), cutoff=cfg.cutoff, dtype=DTYPES[cfg.dtype])


# ---------------------------------------------------------------------------------------
# Worker instrumentation (peak RSS, last-step trace) without touching pipeline.py
# ---------------------------------------------------------------------------------------


def _status_kb(key: str) -> Optional[int]:
    """A ``/proc/self/status`` field in kB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _measured_worker(rank: int, world: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs ``fn`` (the trainer's worker) and adds the process's peak memory.

    ``ru_maxrss`` of a spawned worker is floored by its parent's RSS (the kernel carries
    the pre-exec high-water mark over), so on Linux the peak is read from ``VmHWM``
    after resetting it (``/proc/self/clear_refs``): ``peak`` is then the peak *while
    training* and ``peak - before`` what training added on top of the loaded worker
    (interpreter, torch, the unpickled graphs and batches). Elsewhere ``peak`` is
    ``ru_maxrss``, the lifetime peak. All in kB.
    """
    import resource

    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    before = _status_kb("VmRSS") if reset else None
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn(rank, world, *args, **kwargs)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = _status_kb("VmHWM") if reset else None
    if isinstance(result, dict):
        mem = {"ru_maxrss_before": maxrss_before, "ru_maxrss": maxrss, "reset": reset}
        if reset and before is not None and hwm is not None:
            mem.update(before=before, peak=hwm)
        else:
            mem.update(before=maxrss_before, peak=maxrss)
        result = {**result, "bench_maxrss_kb": mem}
    return result


@contextlib.contextmanager
def capture_worker_results() -> Iterator[List[List[Any]]]:
    """While active, `PipelineTrainer` runs its workers through `_measured_worker` and the
    per-rank results of every launch are appended to the yielded list.

    Done by swapping ``janus_compile.pipeline.launch_local`` for a wrapper (restored on
    exit). If the trainer stops launching through that name, nothing is captured and the
    bench reports estimated memory only.
    """
    from . import pipeline

    real = pipeline.launch_local
    captured: List[List[Any]] = []

    def launch(fn, world_size, args=(), timeout_s=120.0, **kw):
        results = real(_measured_worker, world_size, (fn, *tuple(args)), timeout_s=timeout_s, **kw)
        captured.append(results)
        return results

    pipeline.launch_local = launch
    try:
        yield captured
    finally:
        pipeline.launch_local = real


def _trace_group_times(results: Sequence[Any]) -> Optional[Dict[Tuple[int, str], float]]:
    """Median measured seconds of every (chunk, phase) group over the micro-batches of the
    last step's traces (None without traces)."""
    found: Dict[Tuple[int, str], List[float]] = {}
    for r in results:
        if not isinstance(r, dict) or not r.get("trace"):
            return None
        for e in r["trace"]:
            a = e.get("args")
            if a:
                found.setdefault((int(a["chunk"]), str(a["phase"])), []).append(e["dur"] * 1e-6)
    return {k: statistics.median(v) for k, v in found.items()}


def _simulate_with_times(trainer: Any, times: Mapping[Tuple[int, str], float]) -> float:
    """Makespan of the trainer's programs with each group costing its measured time: what
    is left of the simulator's error once the compute costs are right is its model of the
    runtime (transfers, receive waits, per-message overhead)."""
    import dataclasses

    from .passes.wavek import simulate

    dag = trainer.pipeline_dag()
    cost = {g: float(times.get(g, 0.0)) for g in dag.cost}
    return simulate(trainer.programs, dataclasses.replace(dag, cost=cost)).makespan


def _trace_busy(results: Sequence[Any]) -> Optional[List[float]]:
    """Seconds of Compute per rank in the last step's trace (None without traces)."""
    busy = []
    for r in results:
        if not isinstance(r, dict) or not r.get("trace"):
            return None
        busy.append(sum(e["dur"] for e in r["trace"] if "args" in e) * 1e-6)
    return busy


# ---------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------


def _stats(xs: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _shared_simulation(trainers: Mapping[str, Any], mb: Any, repeats: int = 3, contenders: int = 0) -> Dict[str, Dict[str, Any]]:
    """Re-simulate every trainer's programs with group times taken in one sitting.

    Each trainer times its own groups when it is built (`passes/group_timing.py`), at a
    different moment (on a loaded machine two timings of the same graph differ by tens
    of percent), so its own prediction compares schedules under different loads. Here
    the split graphs of every trainer are timed together, runs interleaved (median of
    ``repeats`` runs on the example micro-batch, one thread), and every program set is
    simulated with those times; the programs are the ones that ran. ``contenders``
    processes run the same graphs meanwhile (`BenchConfig.timing_contenders`): the ranks
    of a local run compute side by side on one host, and each slows the other.
    """
    import dataclasses

    from .passes.group_timing import measure_group_times
    from .passes.wavek import efficiency_bound, simulate

    runs = []
    for tr in trainers.values():
        params, buffers = dict(tr.model.named_parameters()), dict(tr.model.named_buffers())
        runs.append((tr.partition.plan, tr.joint.flat_inputs(params, buffers, mb)))
    timed = measure_group_times(runs, repeats=repeats, contenders=contenders)
    out = {}
    for (sched, tr), group_times in zip(trainers.items(), timed):
        part = dataclasses.replace(tr.partition, group_times=group_times)
        dag = tr.pipeline_dag(part)
        sim = simulate(tr.programs, dag)
        out[sched] = {
            "makespan_s": sim.makespan, "bubble_fraction": sim.bubble_fraction, "efficiency": sim.efficiency,
            "efficiency_bound": efficiency_bound(sim, dag),
            "compute_s": dag.total_work(), "copy_s": sum(t1 - t0 for _, t0, t1, _ in sim.copies),
        }
    return out


def _plan_source(cfg: BenchConfig, name: str, built: Mapping[str, Any], previous: Mapping[str, Any]) -> Tuple[Optional[str], Any]:
    """The trainer whose plan run ``name`` may reuse (`BenchConfig.reuse_plans`), and its
    run name: WaveK of this M for GPipe and WaveK at P in flight (the same SymFold
    splits, no memory cap bounding the ILP), else the same run at the previous M (both
    share partitions), else the first trainer built at this M (1F1B: the joint graph and
    its calibration are shared, the split is made anew). WaveK at 1F1B's memory always
    takes the last: its cap bounds its ILP, so no other run's split serves it."""
    if not cfg.reuse_plans:
        return None, None
    if name in ("gpipe", COUNT_CAP) and "wavek" in built:
        return "wavek", built["wavek"]
    if name in previous and name != EQUAL_MEMORY:
        return name, previous[name]
    first = next(iter(built), None)
    return (first, built[first]) if first is not None else (None, None)


def run_real(
    cfg: BenchConfig, progress: bool = True, on_entry: Optional[Callable[[List[Dict[str, Any]]], None]] = None
) -> List[Dict[str, Any]]:
    """One entry per M: per-schedule measurements and the throughput ratios. ``on_entry``
    gets the entries so far after each M (the CLI writes them out: a long run stopped
    midway keeps the M's it finished)."""
    from .pipeline import PipelineTrainer
    from .runtime.program import Recv

    S = cfg.mb_structures
    structures = bench_structures(cfg, max(cfg.microbatches) * S)
    out = []
    previous: Dict[str, Any] = {}  # the trainers of the previous M
    for M in cfg.microbatches:
        batch = _batch(cfg, structures[: M * S])
        trainers: Dict[str, Any] = {}
        build_s: Dict[str, float] = {}
        plan_from: Dict[str, Optional[str]] = {}
        # 1F1B first: its replayed peak is the memory cap of WaveK at equal memory
        for name in sorted(cfg.runs, key=lambda s: s != "1f1b"):
            sched = "wavek" if name in (EQUAL_MEMORY, COUNT_CAP) else name
            t0 = time.perf_counter()
            model = build_bench_model(cfg.model, cfg.hidden, cfg.layers, cfg.cutoff, cfg.dtype, cfg.seed)
            chunks = {"1f1b": 1, "hanayo": 2}.get(sched, cfg.chunks)
            extra: Dict[str, Any] = {"dump_dir": os.path.join(cfg.dump_dir, f"{name}-M{M}")} if cfg.dump_dir else {}
            if cfg.ilp_time_s is not None:
                extra["ilp_time_limit_s"] = cfg.ilp_time_s
            if name == EQUAL_MEMORY:
                # the trainer's cap counts parameters, gradients and Adam moments on top of the replay
                extra["memory_cap_gb"] = (max(replayed_peaks(trainers["1f1b"], batch)) + optimizer_state_bytes(model)) / 1e9
            elif name == COUNT_CAP:
                extra["memory_cap_gb"] = None
            like_name, like = _plan_source(cfg, name, trainers, previous)
            plan_from[name] = None if like is None else f"{like_name} (M={like.microbatches})"
            trainers[name] = PipelineTrainer(
                model, batch, stages=cfg.stages, chunks=chunks, microbatches=M, schedule=sched, timeout_s=cfg.timeout_s,
                plan_like=like, **extra
            )
            build_s[name] = time.perf_counter() - t0
            if like is not None:
                plan_from[name] += f", {trainers[name].plan_shared}"
            if progress:
                sim = trainers[name].programs.meta["simulated"]
                reused = f" (reused from {plan_from[name]})" if plan_from[name] else ""
                print(f"  [M={M}] built {name}{reused}: {build_s[name]:.1f} s, simulated step {1e3 * sim['makespan_s']:.2f} ms", flush=True)
        previous = trainers
        from .data import split_microbatches

        contenders = cfg.stages - 1 if cfg.timing_contenders is None else cfg.timing_contenders
        shared = _shared_simulation(trainers, split_microbatches(batch, M)[0], contenders=contenders)
        if progress:
            print(f"  [M={M}] simulated steps, {_contenders_note(contenders)}: " + ", ".join(f"{s} {1e3 * v['makespan_s']:.2f} ms" for s, v in shared.items()), flush=True)
        names = cfg.runs
        times: Dict[str, List[float]] = {s: [] for s in names}
        runs: Dict[str, List[Dict[str, Any]]] = {s: [] for s in names}
        for rnd in range(cfg.repeats):
            order = list(names[rnd % len(names):]) + list(names[: rnd % len(names)])
            for sched in order:
                tr = trainers[sched]
                t0 = time.perf_counter()
                with capture_worker_results() as captured:
                    tr.train([batch] * (cfg.warmup + cfg.steps), epochs=1, lr=0.0)
                step_times = list(tr.step_times[cfg.warmup:])
                times[sched] += step_times
                info: Dict[str, Any] = {"round": rnd, "step_times_s": step_times, "wall_s": time.perf_counter() - t0}
                if captured:
                    res = captured[-1]
                    rss = [r.get("bench_maxrss_kb") if isinstance(r, dict) else None for r in res]
                    if all(rss):
                        info["maxrss_mb"] = [x["peak"] / 1024 for x in rss]
                        info["rss_growth_mb"] = [(x["peak"] - x["before"]) / 1024 for x in rss]
                    busy = _trace_busy(res)
                    if busy is not None:
                        info["last_step_compute_s"] = busy
                    group_times = _trace_group_times(res)
                    if group_times is not None:
                        info["sim_traced_costs_s"] = _simulate_with_times(tr, group_times)
                runs[sched].append(info)
                if progress:
                    print(f"  [M={M}] round {rnd + 1}/{cfg.repeats} {sched}: steps " + " ".join(f"{1e3 * t:.1f}" for t in step_times) + " ms", flush=True)
        allocated: Dict[str, List[int]] = {}
        if cfg.allocator_probe:
            for sched in names:
                allocated[sched] = trainers[sched].measure_memory(batch)
                if progress:
                    print(f"  [M={M}] {sched}: allocated peak per rank " + " / ".join(f"{b / 2**20:.0f}" for b in allocated[sched]) + " MB", flush=True)
        per = {}
        for sched in names:
            tr = trainers[sched]
            st = _stats(times[sched])
            sim = tr.programs.meta["simulated"]
            n_struct, n_atoms = batch.num_structures, batch.num_atoms
            mem_est = tr.partition.rank_memory(max(sim.get("peak_in_flight") or [M]))
            replayed = replayed_peaks(tr, batch)
            peak_est = estimated_training_growth(tr, batch, replayed)
            rss = [x["maxrss_mb"] for x in runs[sched] if "maxrss_mb" in x]
            growth = [x["rss_growth_mb"] for x in runs[sched] if "rss_growth_mb" in x]
            busy = [max(x["last_step_compute_s"]) for x in runs[sched] if "last_step_compute_s" in x]
            busy_sum = [sum(x["last_step_compute_s"]) for x in runs[sched] if "last_step_compute_s" in x]
            sim_busy = shared[sched]["compute_s"]
            traced_sim = [x["sim_traced_costs_s"] for x in runs[sched] if "sim_traced_costs_s" in x]
            traced_sim_s = statistics.median(traced_sim) if traced_sim else None
            recv_tensors = [sum(len(a.tensors) for a in prog.actions if isinstance(a, Recv)) for prog in tr.programs.programs]
            per[sched] = {
                "chunks": tr.chunks,
                "chunks_tried": tr.programs.meta.get("chunks_tried", {}),
                # the split solved again on measured group times, where one was (passes/rebalance.py)
                "rebalance": tr.programs.meta.get("rebalance"),
                "partition": tr.partition.method,
                "build_s": build_s[sched],
                # whose plan it reused, and what: "partitions" (with the joint graph and its
                # calibration) or "graphs" (the joint graph and its calibration)
                "plan_reused_from": plan_from[sched],
                "step_s": st,
                "structures_per_s": n_struct / st["median"],
                "atoms_per_s": n_atoms / st["median"],
                # the simulator on the programs that ran, with group times taken together (see
                # `_shared_simulation`); the trainer's own prediction is kept as *_own
                "simulated_step_s": shared[sched]["makespan_s"],
                "sim_rel_error": (shared[sched]["makespan_s"] - st["median"]) / st["median"],
                # the same programs simulated with each group's measured time (last-step traces)
                "simulated_step_s_traced_costs": traced_sim_s,
                "sim_rel_error_traced_costs": None if traced_sim_s is None else (traced_sim_s - st["median"]) / st["median"],
                "sim_bubble_fraction": shared[sched]["bubble_fraction"],
                "sim_efficiency": shared[sched]["efficiency"],
                "sim_efficiency_bound": shared[sched]["efficiency_bound"],  # what any order reaches on this split
                "simulated_step_s_own": sim["makespan_s"],
                "sim_rel_error_own": (sim["makespan_s"] - st["median"]) / st["median"],
                "sim_bubble_fraction_own": sim["bubble_fraction"],
                "sim_efficiency_own": sim["efficiency"],
                "sim_peak_in_flight": sim.get("peak_in_flight"),
                "sim_compute_s": sim_busy,  # total compute of one step, all ranks (calibrated)
                "sim_copy_s": shared[sched]["copy_s"],  # CPU time messages cost, all ranks (copy_cost)
                "measured_compute_s": statistics.median(busy_sum) if busy_sum else None,  # same, from the last-step traces
                "measured_max_rank_compute_s": statistics.median(busy) if busy else None,
                "partition_imbalance": tr.partition.imbalance(),
                "recv_tensors_per_rank": recv_tensors,  # tensors each rank receives per step
                "est_memory_per_rank_mb": [m["total"] / 2**20 for m in mem_est],
                # the executor's peak replayed (passes/memory.py) + gradient and Adam buffers:
                # what the measured training growth should confirm
                "est_peak_growth_mb": [b / 2**20 for b in peak_est],
                # tensors alive at the step's worst moment, measured (allocator events), and
                # what the replay predicts for it: its peak plus GradSync's gradient and
                # bucket buffers (two copies of the parameters)
                "allocated_peak_mb": [b / 2**20 for b in allocated[sched]] if sched in allocated else None,
                "est_allocated_peak_mb": [b / 2**20 for b in estimated_step_allocations(tr, batch, replayed)],
                "measured_peak_rss_mb": [max(col) for col in zip(*rss)] if rss else None,
                "measured_rss_growth_mb": [max(col) for col in zip(*growth)] if growth else None,
                "wavek_rule": tr.programs.meta.get("wavek_rule"),
                "wavek_cap": tr.programs.meta.get("wavek_cap"),
                "memory_cap_gb": tr.compiled.options.memory_cap_gb,
                "ilp_time_limit_s": tr.compiled.options.ilp_time_limit_s,
                "wavek_memory_budget_bytes": tr.programs.meta.get("wavek_memory_budget_bytes"),
                "runs": runs[sched],
            }
        thr = {s: per[s]["structures_per_s"] for s in per}
        out.append(
            {
                "stages": cfg.stages,
                "microbatches": M,
                "structures_per_step": batch.num_structures,
                "atoms_per_step": batch.num_atoms,
                "edges_per_step": batch.num_edges,
                "copy_cost": next(iter(trainers.values())).compiled.options.resolved_copy_cost().describe(),
                # processes running the same graphs while the shared timing ran (`_shared_simulation`)
                "timing_contenders": contenders,
                "schedules": per,
                "ratios": {
                    "wavek/1f1b": _ratio(thr.get("wavek"), thr.get("1f1b")),
                    "wavek/hanayo": _ratio(thr.get("wavek"), thr.get("hanayo")),
                    "wavek/gpipe": _ratio(thr.get("wavek"), thr.get("gpipe")),
                    "wavek@1f1b-mem/1f1b": _ratio(thr.get(EQUAL_MEMORY), thr.get("1f1b")),
                    "wavek@count-P/1f1b": _ratio(thr.get(COUNT_CAP), thr.get("1f1b")),
                    "wavek@count-P/hanayo": _ratio(thr.get(COUNT_CAP), thr.get("hanayo")),
                },
                "sim_ratios": {
                    "wavek/1f1b": _ratio(per.get("1f1b", {}).get("simulated_step_s"), per.get("wavek", {}).get("simulated_step_s")),
                    "wavek/hanayo": _ratio(per.get("hanayo", {}).get("simulated_step_s"), per.get("wavek", {}).get("simulated_step_s")),
                },
            }
        )
        if on_entry is not None:
            on_entry(out)
    return out


# ---------------------------------------------------------------------------------------
# Simulated runs
# ---------------------------------------------------------------------------------------


@dataclass
class _SimModel:
    layers: int
    joint: Any
    node_times: Dict[str, float]
    sizes: Dict[str, int]
    max_units: int
    calibrate_s: float
    state_bytes: int  # parameters, gradients and Adam moments: what every rank holds


def sim_microbatches(cfg: BenchConfig) -> List[Any]:
    """The simulation's two calibration micro-batches (evaluated at the first one's sizes).
    A one-structure micro-batch is captured for exactly one structure (a size guard), so
    its second size is another structure, not two."""
    S = cfg.mb_structures
    structures = bench_structures(cfg, 3 * S)
    return [_batch(cfg, structures[:S]), _batch(cfg, structures[S : 3 * S] if S > 1 else structures[1:2])]


def _prepare_sim_model(
    cfg: BenchConfig, name: str, layers: int, mbs: Sequence[Any], cost_model: Any = None, time_scale: float = 1.0
) -> _SimModel:
    """Capture the joint graph of ``name`` with ``layers`` blocks and price its nodes: with
    ``cost_model`` (timed on another device, `januspipe calibrate`), its times multiplied
    by ``time_scale`` (`device_costs.load_device_costs`), else calibrated on this machine
    (on two micro-batch sizes; evaluated at the first one's)."""
    import janus_compile

    from .compiled import size_values_from_batch
    from .passes.cost import calibrate
    from .passes.units import build_units

    t0 = time.perf_counter()
    model = build_bench_model(name, cfg.hidden, layers, cfg.cutoff, cfg.dtype, cfg.seed)
    compiled = janus_compile.compile(model, mbs[0])
    joint = compiled.joint_graph(mbs[0])
    if cost_model is not None:
        cm = cost_model
    else:
        cm = calibrate(joint, dict(model.named_parameters()), dict(model.named_buffers()), list(mbs), repeats=3)
    sizes = size_values_from_batch(mbs[0])
    node_times = {n: t * time_scale for n, t in cm.times(joint.gm.graph, sizes).items()}
    units = build_units(joint.gm.graph, min_units=10**9)
    return _SimModel(layers, joint, node_times, sizes, len(units.names), time.perf_counter() - t0, optimizer_state_bytes(model))


def hanayo_chunks(sim_chunks: Sequence[int]) -> List[int]:
    """K's the simulated Hanayo is given: 2 (its default wave), and every K >= 2 WaveK is
    given, so that a larger K is not WaveK's advantage alone."""
    return sorted({2} | {k for k in sim_chunks if k >= 2})


def _sim_schedules(
    parts: Dict[Tuple[str, int], Any],
    dag_of: Dict[Tuple[str, int], Any],
    schedules: Sequence[str],
    sim_chunks: Sequence[int],
    sizes: Mapping[str, int],
    equal_memory: bool = True,
    count_cap: bool = True,
    device_budget_bytes: Optional[float] = None,
    baseline_alternatives: Optional[Mapping[Tuple[str, int], Tuple[Any, Any]]] = None,
) -> Dict[str, Any]:
    """Schedule and simulate every schedule on its partition; memory per rank is the
    replayed peak of its programs (`passes.memory.MemoryReplay`) at the micro-batch's
    sizes. WaveK runs as the trainer's default would on a device whose budget for the
    replayed peak is ``device_budget_bytes`` (None: the count cap of P). With
    ``equal_memory`` WaveK also runs under a budget of 1F1B's worst rank (result key
    `EQUAL_MEMORY`), with ``count_cap`` at P in flight whatever the memory (`COUNT_CAP`).
    ``baseline_alternatives``: per key, another (partition, DAG) that Hanayo and GPipe
    may run on instead, the faster kept (`BenchConfig.sim_baseline_splits`). A baseline
    keeps its fastest K; WaveK keeps K as the trainer's ``chunks="auto"`` would (a larger
    K only if shorter by more than `AUTO_CHUNKS_MARGIN`). Each result lists the step of
    every K (and split) tried, ``tried_makespan_s``."""
    from .passes.memory import MemoryReplay
    from .passes.wavek import make_programs
    from .pipeline import AUTO_CHUNKS_MARGIN
    from .runtime.executor import StageGraphs

    alternatives = dict(baseline_alternatives or {})
    replays = {id(p): MemoryReplay(StageGraphs.from_plan(p.plan)) for p in [*parts.values(), *(a[0] for a in alternatives.values())]}
    res: Dict[str, Any] = {}
    names = list(schedules) + ([EQUAL_MEMORY] if equal_memory and {"wavek", "1f1b"} <= set(schedules) else [])
    names += [COUNT_CAP] if count_cap and "wavek" in schedules else []
    # 1F1B first: its replayed peak is the budget of WaveK at equal memory
    for name in sorted(names, key=lambda s: s != "1f1b"):
        sched = "wavek" if name in (EQUAL_MEMORY, COUNT_CAP) else name
        if sched == "1f1b":
            keys = [("unfolded", 1)]
        elif sched == "hanayo":  # a wave needs K >= 2: Hanayo gets every such K WaveK gets, best kept
            keys = [("symfold", k) for k in hanayo_chunks(sim_chunks)]
        elif sched == "wavek":  # in the order chunks="auto" tries them
            keys = [("symfold", k) for k in sorted(sim_chunks)]
        else:  # gpipe: same K as the first wavek K
            keys = [("symfold", sim_chunks[0])]
        candidates = [(parts[key], dag_of[key]) for key in keys if dag_of.get(key) is not None]
        if sched in ("hanayo", "gpipe"):
            candidates += [alternatives[key] for key in keys if key in alternatives]
        # WaveK keeps a K as the trainer's chunks="auto" does: a larger one only when its
        # step is shorter by more than AUTO_CHUNKS_MARGIN; a baseline keeps its fastest
        margin = AUTO_CHUNKS_MARGIN if sched == "wavek" else 0.0
        best = None
        tried: Dict[str, float] = {}
        for part, dag in candidates:
            msz = [dict(sizes)] * dag.microbatches

            def memory_of(programs: Any, replay: Any = replays[id(part)], msz: Any = msz) -> List[float]:
                return replay.peaks(programs, msz)

            kw: Dict[str, Any] = {}
            if name == EQUAL_MEMORY:
                kw = {"memory_budget_bytes": res["1f1b"]["peak_memory_bytes"], "memory_of": memory_of}
            elif name == "wavek" and device_budget_bytes is not None:
                kw = {"memory_budget_bytes": device_budget_bytes, "memory_of": memory_of}
            programs = make_programs(dag, sched, **kw)
            sim = programs.meta["simulated"]
            cand = {
                "chunks": part.chunks, "transfer_charge": part.problem.transfer_charge, "makespan_s": sim["makespan_s"], "efficiency": sim["efficiency"],
                "efficiency_bound": sim.get("efficiency_bound"),
                "bubble_fraction": sim["bubble_fraction"], "peak_in_flight": max(sim["peak_in_flight"]),
                "peak_stash_bytes": max(sim["peak_stash_bytes"], default=0.0),
                "peak_memory_bytes": max(programs.meta.get("wavek_memory_bytes") or memory_of(programs)),
                "wavek_cap": programs.meta.get("wavek_cap"),
                "wavek_memory_fits": programs.meta.get("wavek_memory_fits"),
            }
            tried[f"K={part.chunks}" + (" once" if part.problem.transfer_charge == "once" else "")] = sim["makespan_s"]
            # a K whose schedule fits the memory budget beats one that fell back to the count cap
            over = cand["wavek_memory_fits"] is False
            if best is None or over < (best["wavek_memory_fits"] is False) or (
                over == (best["wavek_memory_fits"] is False) and cand["makespan_s"] < best["makespan_s"] * (1 - margin)
            ):
                best = cand
        if best is not None:
            res[name] = {**best, "tried_makespan_s": tried}
    return res


def _once_charged_splits(
    cfg: BenchConfig, parts: Mapping[Tuple[str, int], Any], errors: Dict[str, str], split: Callable[..., Any]
) -> Dict[Tuple[str, int], Any]:
    """With ``sim_baseline_splits="best"``: for each SymFold K that Hanayo or GPipe runs,
    the split solved (by ``split``, as the trainer's were) with transfers charged once per
    cut edge, where the trainer's split was charged per chunk
    (`BenchConfig.sim_baseline_splits`). A split that cannot be made goes to ``errors``."""
    if cfg.sim_baseline_splits != "best":
        return {}
    ks = set(hanayo_chunks(cfg.sim_chunks)) if "hanayo" in cfg.schedules else set()
    ks |= {cfg.sim_chunks[0]} if "gpipe" in cfg.schedules else set()
    out: Dict[Tuple[str, int], Any] = {}
    for K in sorted(ks):
        trainer_split = parts.get(("symfold", K))
        if trainer_split is None or trainer_split.problem.transfer_charge == "once":
            continue
        try:
            out[("symfold", K)] = split("symfold", K, transfer_charge="once")
        except Exception as exc:  # reported, not fatal: the baselines keep the trainer's split
            errors[f"symfold K={K} charged once"] = f"{type(exc).__name__}: {exc}"
    return out


def run_simulation(
    cfg: BenchConfig, progress: bool = True, on_rows: Optional[Callable[[Dict[str, Any]], None]] = None
) -> Dict[str, Any]:
    """Simulate every schedule on the calibrated real DAGs at every P and M of the grid.
    ``on_rows`` gets the result so far after each simulated M (a study of hours that is
    stopped keeps what it simulated)."""
    from .passes.symfold import partition_graph
    from .passes.wavek import PipelineDAG

    S = cfg.mb_structures
    mbs = sim_microbatches(cfg)
    costs = None
    if cfg.sim_costs:
        from .device_costs import check_costs_cover, load_device_costs

        costs = load_device_costs(cfg.sim_costs)
        check_costs_cover(costs, cfg.sim_models, _sizes_of(mbs[0]), cfg.sim_costs, cfg.dtype)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    bandwidth, latency = cfg.sim_bandwidth_gbs * 1e9, cfg.sim_latency_us * 1e-6

    def so_far() -> Dict[str, Any]:
        return {
            "rows": list(rows),
            "averages": sim_averages(rows),
            "notes": notes,
            "micro_batch": {"structures": S, **_sizes_of(mbs[0])},
            "bandwidth_gb_s": cfg.sim_bandwidth_gbs,
            "device_memory_gb": cfg.sim_memory_gb,
            "costs": dict(costs["meta"], file=cfg.sim_costs) if costs else {"device": "cpu", "timed": "here"},
            "latency_us": cfg.sim_latency_us,
            "paper": PAPER_RATIOS,
        }

    kmax = max([2] + list(cfg.sim_chunks))
    for name in cfg.sim_models:
        cache: Dict[int, _SimModel] = {}

        def get(layers: int) -> _SimModel:
            if layers not in cache:
                given = (costs["models"][name], costs["scales"][name]) if costs else (None, 1.0)
                cache[layers] = _prepare_sim_model(cfg, name, layers, mbs, *given)
                if progress:
                    sm = cache[layers]
                    how = f"priced from {cfg.sim_costs}" if costs else "calibrated"
                    print(f"  [sim] {name} with {layers} blocks: {sm.max_units} units, {how} in {sm.calibrate_s:.1f} s", flush=True)
            return cache[layers]

        base = get(cfg.layers)
        for P in cfg.sim_stages:
            need = math.ceil(SIM_UNITS_PER_CHUNK * P * kmax)
            layers, sm = cfg.layers, base
            while sm.max_units < need and layers < MAX_SIM_LAYERS:
                # units grow about linearly with blocks: extrapolate through this model and
                # the deepest other one captured (with none: units per block, a lower bound)
                l2, u2 = layers, sm.max_units
                others = [(l, c.max_units) for l, c in cache.items() if l != layers]
                l1, u1 = max(others, key=lambda x: x[0]) if others else (0, 0)
                per_layer = max(1.0, (u2 - u1) / (l2 - l1)) if l2 != l1 else max(1.0, u2 / l2)
                layers = min(MAX_SIM_LAYERS, max(layers + 1, l2 + math.ceil((need - u2) / per_layer)))
                sm = get(layers)
            if layers != cfg.layers:
                note = f"{name} at P={P}: {cfg.layers} blocks give {base.max_units} units, fewer than {need}; simulated with {layers} blocks ({sm.max_units} units)"
                notes.append(note)
            parts: Dict[Tuple[str, int], Any] = {}
            errors: Dict[str, str] = {}
            t0 = time.perf_counter()
            keys = {("unfolded", 1)} | {("symfold", k) for k in [*cfg.sim_chunks, *hanayo_chunks(cfg.sim_chunks)]}

            def split(method: str, K: int, **charge: str) -> Any:
                # the ILP prices transfers at the simulated link's speed
                return partition_graph(
                    sm.joint.gm, P, K, method, node_times=sm.node_times, sizes=sm.sizes, time_limit_s=cfg.sim_ilp_time_s,
                    bandwidth_bytes_per_s=bandwidth, **charge,
                )

            for method, K in sorted(keys):
                try:
                    parts[(method, K)] = split(method, K)
                except Exception as exc:  # a partition the model cannot give: reported, not fatal
                    errors[f"{method} K={K}"] = f"{type(exc).__name__}: {exc}"
            alternatives = _once_charged_splits(cfg, parts, errors, split)
            part_s = time.perf_counter() - t0
            # the trainer's default, memory_cap_gb='auto', on a device of sim_memory_gb
            budget = AUTO_MEMORY_FRACTION * cfg.sim_memory_gb * 1e9 - sm.state_bytes
            for f in cfg.sim_factors:
                M = f * P
                def dag(p: Any) -> Any:
                    return PipelineDAG.from_partition(p, M, bandwidth_bytes_per_s=bandwidth, latency_s=latency)

                dags = {k: dag(p) for k, p in parts.items()}
                res = _sim_schedules(
                    parts, dags, cfg.schedules, cfg.sim_chunks, sm.sizes, cfg.equal_memory, cfg.count_cap, budget,
                    baseline_alternatives={k: (p, dag(p)) for k, p in alternatives.items()},
                )
                thr = {s: M * S / r["makespan_s"] for s, r in res.items()}
                row = {
                    "model": name,
                    "layers": layers,
                    "stages": P,
                    "microbatches": M,
                    "schedules": res,
                    "structures_per_s": thr,
                    "ratios": {
                        "wavek/1f1b": _ratio(thr.get("wavek"), thr.get("1f1b")),
                        "wavek/hanayo": _ratio(thr.get("wavek"), thr.get("hanayo")),
                        "wavek/gpipe": _ratio(thr.get("wavek"), thr.get("gpipe")),
                        "wavek@1f1b-mem/1f1b": _ratio(thr.get(EQUAL_MEMORY), thr.get("1f1b")),
                        "wavek@count-P/1f1b": _ratio(thr.get(COUNT_CAP), thr.get("1f1b")),
                        "wavek@count-P/hanayo": _ratio(thr.get(COUNT_CAP), thr.get("hanayo")),
                    },
                    "wavek_efficiency": res.get("wavek", {}).get("efficiency"),
                    # the most any schedule reaches on WaveK's partition: what is left is fill, drain, links and imbalance
                    "wavek_efficiency_bound": res.get("wavek", {}).get("efficiency_bound"),
                    "wavek_eqmem_efficiency": res.get(EQUAL_MEMORY, {}).get("efficiency"),
                    "wavek_count_efficiency": res.get(COUNT_CAP, {}).get("efficiency"),
                    "imbalance": {
                        **{f"{m} K={k}": p.imbalance() for (m, k), p in parts.items()},
                        **{f"{m} K={k} charged once": p.imbalance() for (m, k), p in alternatives.items()},
                    },
                    "transfer_charge": {f"{m} K={k}": p.problem.transfer_charge for (m, k), p in parts.items()},
                    "partition_s": part_s,
                    "errors": errors,
                }
                rows.append(row)
                if progress:
                    r = row["ratios"]
                    print(
                        f"  [sim] {name} P={P} M={M}: wavek/1f1b {_fmt(r['wavek/1f1b'])}, wavek/hanayo {_fmt(r['wavek/hanayo'])}, "
                        f"wavek eff {_fmt(row['wavek_efficiency'])}; at P in flight: wavek/1f1b {_fmt(r['wavek@count-P/1f1b'])}; "
                        f"at 1F1B's memory: wavek/1f1b {_fmt(r['wavek@1f1b-mem/1f1b'])}",
                        flush=True,
                    )
                if on_rows is not None:  # after every M: a P of hours stopped midway keeps its rows
                    on_rows(so_far())
    return so_far()


def _sizes_of(batch: Any) -> Dict[str, int]:
    return {"atoms": batch.num_atoms, "edges": batch.num_edges}


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def _gmean(xs: Sequence[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x) and x > 0]
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None


def sim_averages(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per P (and over all P): arithmetic and geometric means over models and M."""
    out = []
    groups = sorted({r["stages"] for r in rows})
    for P in groups + ["all"]:
        sel = [r for r in rows if P == "all" or r["stages"] == P]
        out.append(
            {
                "stages": P,
                "n": len(sel),
                "wavek/1f1b": _mean([r["ratios"]["wavek/1f1b"] for r in sel]),
                "wavek/hanayo": _mean([r["ratios"]["wavek/hanayo"] for r in sel]),
                "wavek/1f1b_gmean": _gmean([r["ratios"]["wavek/1f1b"] for r in sel]),
                "wavek/hanayo_gmean": _gmean([r["ratios"]["wavek/hanayo"] for r in sel]),
                "wavek_efficiency": _mean([r["wavek_efficiency"] for r in sel]),
                "wavek_efficiency_bound": _mean([r.get("wavek_efficiency_bound") for r in sel]),
                "wavek@1f1b-mem/1f1b": _mean([r["ratios"].get("wavek@1f1b-mem/1f1b") for r in sel]),
                "wavek_eqmem_efficiency": _mean([r.get("wavek_eqmem_efficiency") for r in sel]),
                "wavek@count-P/1f1b": _mean([r["ratios"].get("wavek@count-P/1f1b") for r in sel]),
                "wavek@count-P/hanayo": _mean([r["ratios"].get("wavek@count-P/hanayo") for r in sel]),
                "wavek_count_efficiency": _mean([r.get("wavek_count_efficiency") for r in sel]),
            }
        )
    return out


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _times(x: Optional[float], bold: bool = False) -> str:
    """A ratio as "1.23×" (bold: "**1.23×**"), or "n/a"."""
    text = _fmt(x)
    if text == "n/a":
        return text
    return f"**{text}×**" if bold else f"{text}×"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:+.0f}%"


def replayed_peaks(trainer: Any, batch: Any) -> List[float]:
    """Peak bytes per rank of the trainer's programs on ``batch``, replayed
    (`passes.memory.program_memory`: held values, posted receives, working sets)."""
    from .compiled import size_values_from_batch
    from .data import split_microbatches
    from .passes.memory import program_memory

    sizes = [size_values_from_batch(mb) for mb in split_microbatches(batch, trainer.microbatches)]
    return [m.peak_bytes for m in program_memory(trainer.graphs, trainer.programs, sizes)]


def estimated_step_allocations(trainer: Any, batch: Any, peaks: Optional[Sequence[float]] = None) -> List[float]:
    """Bytes per rank one step allocates at its worst moment: the replayed peak (``peaks``
    if already replayed) plus GradSync's summed gradients and their flattened buckets
    (`runtime/gradsync.py`)."""
    grads = 2 * param_bytes(trainer.model)
    return [b + grads for b in (replayed_peaks(trainer, batch) if peaks is None else peaks)]


def estimated_training_growth(trainer: Any, batch: Any, peaks: Optional[Sequence[float]] = None) -> List[float]:
    """Bytes per rank that a training step adds on top of the loaded worker: the program's
    replayed peak (``peaks`` if already replayed) plus the summed gradients and the two
    Adam moments, which every rank holds for every parameter (parameters are replicated)."""
    state = 3 * param_bytes(trainer.model)
    return [b + state for b in (replayed_peaks(trainer, batch) if peaks is None else peaks)]


def worst_growth_ratio(growth: Optional[Sequence[float]], est: Optional[Sequence[float]]) -> Optional[float]:
    """Measured training growth / replayed estimate of the same rank, the largest over
    ranks (None without both)."""
    ratios = [g / x for g, x in zip(growth or [], est or []) if x > 0]
    return max(ratios) if ratios else None


def _contenders_note(contenders: Optional[int]) -> str:
    """How the shared timing ran, for the progress line and a table's heading (entries
    from before the option have none: timed alone)."""
    if not contenders:
        return "groups timed together, alone"
    return f"groups timed together beside {contenders} process{'es' if contenders != 1 else ''} running the same graphs"


def markdown_real(entries: Sequence[Dict[str, Any]]) -> str:
    lines = []
    for e in entries:
        lines.append(
            f"**P={e['stages']}, M={e['microbatches']}** ({e['structures_per_step']} structures, "
            f"{e['atoms_per_step']} atoms, {e['edges_per_step']} edges per step; messages cost each rank "
            f"{e.get('copy_cost', 'nothing')} in the simulator"
            f"; {_contenders_note(e.get('timing_contenders'))})\n"
        )
        lines.append(
            "| schedule | K | median step ms | min | max | structures/s | atoms/s | simulated ms, shared timing (own) | sim error "
            "| sim error, traced costs | sim bubble | sim efficiency (bound) | compute ms timed / traced | sim copy ms | recv tensors/rank "
            "| est. stash+params/rank MB | est. peak growth/rank MB | peak RSS/rank MB (training growth) | growth measured/est. "
            "| allocated peak/rank MB, measured (replayed) | allocated measured/replayed |"
        )
        lines.append("|---" * 22 + "|")
        for s, r in e["schedules"].items():
            st = r["step_s"]
            rss = r["measured_peak_rss_mb"]
            growth = r["measured_rss_growth_mb"]
            rss_txt = "n/a" if rss is None else f"{max(rss):.0f} (+{max(growth):.0f})"
            est = r.get("est_peak_growth_mb")
            ratio = _fmt(worst_growth_ratio(growth, est))
            lines.append(
                f"| {s} | {r['chunks']} | {1e3 * st['median']:.1f} | {1e3 * st['min']:.1f} | {1e3 * st['max']:.1f} "
                f"| {r['structures_per_s']:.1f} | {r['atoms_per_s']:.0f} | {1e3 * r['simulated_step_s']:.1f} ({1e3 * r['simulated_step_s_own']:.1f}) "
                f"| {_pct(r['sim_rel_error'])} | {_pct(r.get('sim_rel_error_traced_costs'))} "
                f"| {100 * r['sim_bubble_fraction']:.1f}% | {r['sim_efficiency']:.2f} ({_fmt(r.get('sim_efficiency_bound'))}) "
                f"| {1e3 * r['sim_compute_s']:.0f} / {_fmt(None if r['measured_compute_s'] is None else 1e3 * r['measured_compute_s'], '.0f')} "
                f"| {_fmt(None if r.get('sim_copy_s') is None else 1e3 * r['sim_copy_s'], '.0f')} | {max(r['recv_tensors_per_rank'])} "
                f"| {max(r['est_memory_per_rank_mb']):.2f} | {_fmt(max(est) if est else None, '.0f')} | {rss_txt} | {ratio} "
                f"| {_allocated_text(r)} |"
            )
        ra, sr = e["ratios"], e["sim_ratios"]
        plain = e["schedules"].get("wavek")
        if plain and plain.get("wavek_memory_budget_bytes"):
            lines.append(
                f"\nwavek: memory_cap_gb={plain.get('memory_cap_gb')!r}, {plain['wavek_memory_budget_bytes'] / 1e9:.3g} GB per rank "
                f"for the replayed peak, in-flight cap {_cap_text(plain.get('wavek_cap'))}."
            )
        rebalanced = [
            f"{s} (simulated {1e3 * r['rebalance']['simulated_step_s']:.0f} → {1e3 * r['rebalance']['rebalanced_simulated_step_s']:.0f} ms, "
            + ("kept)" if r["rebalance"]["kept"] else "not kept)")
            for s, r in e["schedules"].items()
            if r.get("rebalance") and r["rebalance"].get("rebalanced_simulated_step_s") is not None
        ]
        if rebalanced:
            lines.append("\nsplit solved again on measured group times (`rebalance`): " + ", ".join(rebalanced) + ".")
        if COUNT_CAP in e["schedules"]:
            lines.append(
                f"\n{COUNT_CAP}: WaveK at most P micro-batches in flight per rank (memory_cap_gb=None); measured "
                f"{COUNT_CAP}/1f1b **{_fmt(ra.get('wavek@count-P/1f1b'))}×**, {COUNT_CAP}/hanayo "
                f"**{_fmt(ra.get('wavek@count-P/hanayo'))}×**."
            )
        wk = e["schedules"].get(EQUAL_MEMORY)
        if wk and wk.get("memory_cap_gb"):
            lines.append(
                f"\n{EQUAL_MEMORY}: WaveK under a cap of {wk['memory_cap_gb']:.3g} GB per rank (1F1B's replayed peak plus "
                f"parameters, gradients and Adam moments), in-flight cap {_cap_text(wk.get('wavek_cap'))}; "
                f"measured {EQUAL_MEMORY}/1f1b **{_fmt(ra.get('wavek@1f1b-mem/1f1b'))}×**."
            )
        gpipe = f", wavek/gpipe {_times(ra['wavek/gpipe'])}" if "gpipe" in e["schedules"] else ""
        lines.append(
            f"\nmeasured: wavek/1f1b {_times(ra['wavek/1f1b'], True)}, wavek/hanayo {_times(ra['wavek/hanayo'], True)}{gpipe}; "
            f"simulated: wavek/1f1b {_times(sr['wavek/1f1b'])}, wavek/hanayo {_times(sr['wavek/hanayo'])}\n"
        )
    return "\n".join(lines)


def _allocated_text(r: Mapping[str, Any]) -> str:
    """'measured (replayed) | ratio' cells, per rank, for the real-run table."""
    got, est = r.get("allocated_peak_mb"), r.get("est_allocated_peak_mb")
    if not got or not est:
        return "n/a | n/a"
    mb = " / ".join(f"{g:.0f} ({e:.0f})" for g, e in zip(got, est))
    return f"{mb} | " + " / ".join(f"{g / e:.2f}" if e > 0 else "n/a" for g, e in zip(got, est))


def _cap_text(cap: Any) -> str:
    """A WaveK cap for a table: the number, or min–max when it differs per rank."""
    if cap is None:
        return "n/a"
    if isinstance(cap, list):
        return f"{min(cap)}–{max(cap)}"
    return str(cap)


def _memory_ratio(row: Mapping[str, Any], name: str) -> Optional[float]:
    sch = row["schedules"]
    a, b = sch.get(name, {}).get("peak_memory_bytes"), sch.get("1f1b", {}).get("peak_memory_bytes")
    return a / b if a and b else None


def _split_text(result: Mapping[str, Any]) -> str:
    """A simulated schedule's K, with ", once" where its split charged transfers once."""
    if "chunks" not in result:
        return "n/a"
    return f"{result['chunks']}, once" if result.get("transfer_charge") == "once" else str(result["chunks"])


def markdown_sim(sim: Dict[str, Any]) -> str:
    rows = sim["rows"]
    scheds = [s for s in SCHEDULES if any(s in r["schedules"] for r in rows)]
    head = (
        "| model | blocks | P | M | " + " | ".join(f"{s} str/s" for s in scheds)
        + " | wavek K | hanayo K | wavek cap | wavek/1f1b | wavek/hanayo | wavek eff. (bound) | mem / 1f1b mem: wavek, hanayo "
        + "| P in flight: wavek/1f1b | wavek/hanayo | wavek eff. | mem / 1f1b mem "
        + "| at 1F1B's mem: wavek cap | wavek/1f1b | wavek eff. |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        thr = r["structures_per_s"]
        wk, eq = r["schedules"].get("wavek", {}), r["schedules"].get(EQUAL_MEMORY, {})
        ra = r["ratios"]
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['stages']} | {r['microbatches']} | "
            + " | ".join(_fmt(thr.get(s), ".1f") for s in scheds)
            + f" | {_split_text(wk)} | {_split_text(r['schedules'].get('hanayo', {}))} | {_cap_text(wk.get('wavek_cap'))} | {_fmt(ra['wavek/1f1b'])} | {_fmt(ra['wavek/hanayo'])} "
            + f"| {_fmt(r['wavek_efficiency'])} ({_fmt(r.get('wavek_efficiency_bound'))}) | {_fmt(_memory_ratio(r, 'wavek'))}, {_fmt(_memory_ratio(r, 'hanayo'))} "
            + f"| {_fmt(ra.get('wavek@count-P/1f1b'))} | {_fmt(ra.get('wavek@count-P/hanayo'))} | {_fmt(r.get('wavek_count_efficiency'))} "
            + f"| {_fmt(_memory_ratio(r, COUNT_CAP))} "
            + f"| {_cap_text(eq.get('wavek_cap'))} | {_fmt(ra.get('wavek@1f1b-mem/1f1b'))} | {_fmt(r.get('wavek_eqmem_efficiency'))} |"
        )
    lines += [
        "",
        "| P | rows | wavek/1f1b mean (geo) | wavek/hanayo mean (geo) | wavek efficiency (bound) | P in flight: wavek/1f1b "
        "| wavek/hanayo | wavek efficiency | at 1F1B's mem: wavek/1f1b | wavek efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in sim["averages"]:
        lines.append(
            f"| {a['stages']} | {a['n']} | {_fmt(a['wavek/1f1b'])} ({_fmt(a['wavek/1f1b_gmean'])}) | "
            f"{_fmt(a['wavek/hanayo'])} ({_fmt(a['wavek/hanayo_gmean'])}) | {_fmt(a['wavek_efficiency'])} ({_fmt(a.get('wavek_efficiency_bound'))}) "
            f"| {_fmt(a.get('wavek@count-P/1f1b'))} | {_fmt(a.get('wavek@count-P/hanayo'))} | {_fmt(a.get('wavek_count_efficiency'))} "
            f"| {_fmt(a.get('wavek@1f1b-mem/1f1b'))} | {_fmt(a.get('wavek_eqmem_efficiency'))} |"
        )
    p = sim["paper"]
    lines.append(f"\npaper (32 GPUs, averaged): wavek/1f1b {p['wavek/1f1b']}×, wavek/hanayo {p['wavek/hanayo']}×")
    for n in sim["notes"]:
        lines.append(f"\nnote: {n}")
    for r in rows:
        for k, v in r["errors"].items():
            lines.append(f"\nnote: {r['model']} P={r['stages']} M={r['microbatches']}: partition {k} failed: {v}")
    return "\n".join(lines)


def machine_info() -> Dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": "gloo (local processes, loopback)",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_bench(
    cfg: BenchConfig, progress: bool = True, on_partial: Optional[Callable[[Dict[str, Any]], None]] = None
) -> Dict[str, Any]:
    """Everything the config asks for, as one JSON-ready dict. ``on_partial`` gets the
    result so far (marked ``"partial": True``) after each real M and each simulated
    row (model, P, M)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # calibrate as the workers run: one thread each
    t0 = time.perf_counter()
    try:
        result: Dict[str, Any] = {"config": asdict(cfg), "machine": machine_info()}

        def partial(part: str, so_far: Any) -> None:
            if on_partial is not None:
                on_partial({**result, part: so_far, "partial": True, "wall_s": time.perf_counter() - t0})

        if cfg.real:
            result["real"] = run_real(cfg, progress, on_entry=lambda entries: partial("real", list(entries)))
        if cfg.simulate:
            result["simulated"] = run_simulation(cfg, progress, on_rows=lambda sim: partial("simulated", sim))
    finally:
        torch.set_num_threads(threads)
    result["wall_s"] = time.perf_counter() - t0
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def report(result: Dict[str, Any]) -> str:
    cfg = result["config"]
    m = result["machine"]
    out = [
        f"# januspipe bench: {cfg['model']} (hidden {cfg['hidden']}, {cfg['layers']} blocks, {cfg['dtype']}), "
        f"{m['cpus']} CPUs, torch {m['torch']}, {m['backend']}\n"
    ]
    if "real" in result:
        out += ["## Real runs\n", markdown_real(result["real"])]
    if "simulated" in result:
        mb = result["simulated"]["micro_batch"]
        costs = result["simulated"].get("costs", {})
        where = "here" if costs.get("timed") == "here" or not costs else f"on {costs.get('device_name', costs.get('device'))} ({costs.get('file')})"
        out += [
            f"## Simulated (costs calibrated {where}; micro-batch {mb['structures']} structures, {mb['atoms']} atoms, "
            f"{mb['edges']} edges; links {result['simulated']['bandwidth_gb_s']} GB/s, {result['simulated']['latency_us']} µs)\n",
            markdown_sim(result["simulated"]),
        ]
    out.append(f"\nbench wall time {result['wall_s']:.0f} s")
    return "\n".join(out)


def config_from_args(args: Any) -> BenchConfig:
    return BenchConfig(
        model=args.model,
        hidden=args.hidden,
        layers=args.layers,
        cutoff=args.cutoff,
        dtype=args.dtype,
        seed=args.seed,
        stages=args.stages,
        chunks=args.chunks,
        microbatches=list(args.microbatches),
        schedules=list(args.schedules),
        repeats=args.repeats,
        steps=args.steps,
        warmup=args.warmup,
        mb_structures=args.mb_structures,
        atoms=args.atoms,
        large=args.large,
        real=not args.no_real,
        simulate=args.simulate,
        sim_models=list(args.sim_models),
        sim_stages=list(args.sim_stages),
        sim_factors=list(args.sim_factors),
        sim_chunks=list(args.sim_chunks),
        sim_ilp_time_s=args.sim_ilp_time,
        sim_baseline_splits=args.sim_baseline_splits,
        ilp_time_s=args.ilp_time_limit,
        reuse_plans=not args.no_plan_reuse,
        sim_costs=args.sim_costs,
        sim_bandwidth_gbs=args.sim_bandwidth,
        sim_latency_us=args.sim_latency_us,
        equal_memory=not args.no_equal_memory,
        count_cap=not args.no_count_cap,
        sim_memory_gb=args.sim_memory_gb,
        allocator_probe=not args.no_allocator_probe,
        timing_contenders=args.timing_contenders,
        dump_dir=args.dump_dir,
    )


def add_bench_args(p: Any) -> None:
    p.add_argument("--stages", type=int, default=2, help="P: pipeline stages = local processes")
    p.add_argument(
        "--chunks", type=chunks_arg, default="auto",
        help="K for wavek and gpipe: a number, or auto (default: the fastest of K = 1, 2 and 4 in the simulator, a larger K "
        "only if more than 3 %% faster); hanayo always 2, 1f1b 1",
    )
    p.add_argument("--microbatches", type=int, nargs="+", default=[4], help="M, one or more (e.g. 4 8 16)")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--repeats", type=int, default=3, help="rounds; schedules alternate round-robin within each")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run (default 3: the workers' heap grows over the first few)")
    p.add_argument("--mb-structures", type=int, default=None, help="structures per micro-batch (default 2; 1 with --large)")
    p.add_argument("--atoms", type=int, default=16, help="atoms per EMT structure")
    p.add_argument("--large", type=int, default=None, metavar="N", help="use >= N-atom fcc Cu supercells (large_structure)")
    p.add_argument("--out", default=None, help="write the results as JSON here (also after each M of the real runs and each simulated model and P, marked partial)")
    p.add_argument(
        "--ilp-time-limit", type=float, default=None, metavar="S",
        help="ILP time limit per solve (s) when the real runs are planned (default: the trainer's, 30 s); lower plans faster, a little less balanced",
    )
    p.add_argument("--markdown", default=None, help="write the tables as markdown here")
    p.add_argument("--plots", default=None, metavar="DIR", help="write SVG charts of the results here (also `januspipe plot RESULTS.json`)")
    p.add_argument("--no-real", action="store_true", help="skip the real multi-process runs")
    p.add_argument("--simulate", action="store_true", help="also simulate every schedule at P in --sim-stages")
    p.add_argument("--sim-models", nargs="+", default=["schnet", "painn", "nequip"], choices=["schnet", "painn", "nequip"])
    p.add_argument("--sim-stages", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--sim-factors", type=int, nargs="+", default=[1, 2, 4], help="simulated M = factor × P")
    p.add_argument("--sim-chunks", type=int, nargs="+", default=[1, 2], help="K tried for simulated wavek (best kept); hanayo gets 2 and those >= 2")
    p.add_argument(
        "--sim-ilp-time", type=float, default=JanusOptions.ilp_time_limit_s,
        help="ILP time limit per split in the simulation (s; default: the trainer's, 30 s); the studies in docs/benchmarks.md mostly use 2 to save hours",
    )
    p.add_argument(
        "--sim-baseline-splits", choices=list(SIM_BASELINE_SPLITS), default="best",
        help="best (default): simulated Hanayo and GPipe keep the faster of the trainer's split and one with transfers "
        "charged once per cut edge; trainer: every schedule on the trainer's split (WaveK always is)",
    )
    p.add_argument(
        "--sim-costs", default=None, metavar="FILE",
        help="price the simulated models with cost models timed on another device (`januspipe calibrate --out FILE`) instead of calibrating here",
    )
    p.add_argument("--sim-bandwidth", type=float, default=25.0, help="simulated link bandwidth, GB/s")
    p.add_argument("--sim-latency-us", type=float, default=20.0, help="simulated message latency, µs")
    p.add_argument(
        "--no-plan-reuse", action="store_true",
        help="plan every trainer alone (default: a run reuses the partitions of the same run at the previous M, "
        "GPipe and WaveK at P in flight those of WaveK, and only the schedule is made again; the others reuse "
        "the joint graph and calibration of the first trainer built at that M)",
    )
    p.add_argument(
        "--no-equal-memory", action="store_true",
        help=f"skip the {EQUAL_MEMORY} row (WaveK limited to the peak memory 1F1B uses, replayed; in-flight caps up to min(M, 3P) searched)",
    )
    p.add_argument(
        "--no-count-cap", action="store_true",
        help=f"skip the {COUNT_CAP} row (WaveK held to P micro-batches in flight per rank; the wavek row fills a share of the device's memory)",
    )
    p.add_argument(
        "--sim-memory-gb", type=float, default=80.0,
        help="memory of one simulated device (GB): the simulated wavek row may fill the share memory_cap_gb='auto' takes of it",
    )
    p.add_argument(
        "--timing-contenders", type=int, default=None, metavar="N",
        help="processes that run the same split graphs while the shared timing times them, as the other ranks "
        "load the host beside each rank (default: P - 1; 0 times alone, as before)",
    )
    p.add_argument(
        "--no-allocator-probe", action="store_true",
        help="skip the extra, untimed step per schedule whose tensor allocations are recorded (the measured peak beside the replay)",
    )


def write_json(path: str, result: Mapping[str, Any]) -> None:
    """Write ``result`` whole or not at all (a run stopped mid-write keeps the last file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def main(args: Any) -> int:
    cfg = config_from_args(args)
    check_output_folder(args.out, "--out")
    check_output_folder(args.markdown, "--markdown")
    result = run_bench(cfg, on_partial=(lambda r: write_json(args.out, r)) if args.out else None)
    if args.out:  # before the report: nothing measured is lost if formatting fails
        write_json(args.out, result)
    text = report(result)
    print(text)
    if args.out:
        print(f"wrote {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.plots:
        from .bench_plots import write_bench_plots

        for path in write_bench_plots(result, args.plots):
            print(f"wrote {path}")
    return 0
