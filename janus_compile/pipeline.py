"""`PipelineTrainer`: compile once, schedule, and train on a (pp, dp, gp) mesh of processes.

The parent process captures the model, builds the joint graph, shards its edges for
graph parallelism (`passes/gp.py`, when gp > 1), partitions it (SymFold, or the unfolded
partition for the 1F1B baseline), generates one program per pipeline stage with the
chosen schedule and validates them. Workers (pp × dp × gp processes, placed as
`runtime/mesh.py` describes) receive the split graphs and programs (pickled). Every
(dp, gp) slice runs the same pipeline programs: replica d on its own micro-batches, gp
rank g on its shard of every micro-batch's edges. Parameters stay in sync with one
bucketed gradient all-reduce per step over the (pp, dp) ranks of each gp index (each
gradient is computed on one stage of every replica; the other stages contribute zeros),
after which every rank applies the same optimizer step. Parameters are small next to an
MLIP's activations, so replicating them keeps the runtime simple; what is pipelined and
sharded is the activation memory and the compute.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .compiled import CompiledMLIP, compile as compile_model, size_values_from_batch
from .data.batch import AtomsBatch
from .data.batch import BatchError
from .data.collate import edge_shard, split_microbatches
from .losses import EnergyForceLoss
from .options import AUTO_CHUNKS, JanusOptions
from .passes.symfold_ilp import PartitionError
from .passes.wavek import ScheduleError
from .runtime.executor import RankExecutor, StageGraphs
from .runtime.launch import backend_for, init_from_env, launch_local, local_device, torchrun_world
from .runtime.memory_probe import allocation_peak
from .runtime.program import ProgramSet, send_releases

log = logging.getLogger(__name__)

PARTITION_OF_SCHEDULE = {"1f1b": "unfolded"}
AUTO_CHUNK_CANDIDATES = (1, 2, 4)  # what chunks='auto' tries (a K the model has too few units for is skipped)
AUTO_CHUNKS_MARGIN = 0.03
"""How much shorter a larger K's simulated step must be to be kept. Before the simulator
charged what a message costs the ranks' CPUs, it put K = 2 of SchNet (1008 atoms, P = 2)
at 0.89 / 0.90 / 0.95 of K = 1's step for M = 2 / 4 / 8, and K = 2 ran at
0.97–0.99 / 1.04 / 1.10 of it (K = 2 sends 7x the bytes and twice the messages). With
the copy cost (`copy_cost`) it puts K = 2 at 0.94 / 0.98 / 1.06; the margin keeps K = 1
where the two are closer than the simulator's remaining error."""


@dataclass
class StepOutput:
    loss: float
    grads: Dict[str, torch.Tensor]  # parameter name -> gradient of the whole batch
    outputs: Dict[str, torch.Tensor] = field(default_factory=dict)  # energy, forces, stress of the whole batch


def _flat_inputs(spec: Mapping[str, List[str]], params, buffers, mb: AtomsBatch) -> List[Any]:
    """The joint graph's inputs for one micro-batch (same order as `JointGraph.flat_inputs`)."""
    return (
        [params[n] for n in spec["param_names"]]
        + [buffers[n] for n in spec["buffer_names"]]
        + [getattr(mb, f) for f in spec["batch_fields"] + spec["target_fields"]]
    )


def local_microbatches(batch: AtomsBatch, microbatches: int, dp_rank: int, dp: int, gp_rank: int, gp: int) -> List[AtomsBatch]:
    """This rank's share of a global batch: replica ``dp_rank``'s ``microbatches``
    micro-batches (of dp × microbatches in all, normalised by the whole batch), each cut
    to the rank's edge shard."""
    if dp * microbatches > batch.num_structures:
        raise BatchError(
            f"a batch of {batch.num_structures} structure(s) cannot feed data_parallel={dp} replicas x "
            f"{microbatches} micro-batches (micro-batches hold whole structures): use batches of at least "
            f"{dp * microbatches} structures, or fewer replicas or micro-batches"
        )
    mine = split_microbatches(batch, dp * microbatches)[dp_rank * microbatches : (dp_rank + 1) * microbatches]
    return [edge_shard(mb, gp_rank, gp) for mb in mine] if gp > 1 else mine


def _train_worker(
    rank: int,
    world: int,
    setup: Dict[str, Any],
    batches: Sequence[AtomsBatch],
    epochs: int,
    lr: float,
    return_grads: bool,
):
    """Runs in every worker process: the whole training loop for this rank.

    Returns the loss of every step, the time of every step (between barriers, so it is
    the pipeline's step time), the trace of the last step and, with ``return_grads``,
    the gradients and the model outputs of the last step. With a checkpoint path, rank 0
    writes one after every epoch (every rank holds the same parameters and optimizer
    state, so rank 0's copy is the whole model).
    """
    import time

    from .runtime.collectives import set_graph_parallel_group
    from .runtime.gc_control import StepGarbageCollection
    from .runtime.gradsync import OverlappedGradSync, gradient_ready_at
    from .runtime.mesh import init_parallel_mesh
    from .training import write_checkpoint

    graphs: StageGraphs = setup["graphs"]
    programs = ProgramSet.from_json(setup["programs"])
    joint = setup["joint"]
    pp, dp, gp = setup["mesh"]
    device = local_device(setup.get("device", "cpu"), rank)
    if device.type != "cpu":
        graphs = graphs.on_device(device)  # tensors the graphs create, and their constants
    mesh = init_parallel_mesh(pp, dp, gp, device.type)
    set_graph_parallel_group(mesh.gp_group)
    params = {k: v.detach().to(device, copy=True).requires_grad_(False) for k, v in setup["params"].items()}
    buffers = {k: v.to(device) for k, v in setup["buffers"].items()}
    executor = RankExecutor(
        mesh.pp_rank, graphs, programs.programs[mesh.pp_rank], device, peers=mesh.peers,
        releases=send_releases(programs, mesh.pp_rank), inductor=setup.get("inductor", False),
    )
    param_names = list(params)
    n_out = len(joint["output_names"])
    output_args = graphs.output_args[1 : 1 + n_out]
    grad_args = graphs.output_args[1 + n_out :]
    program = programs.programs[mesh.pp_rank]
    sync = OverlappedGradSync(
        [params[n] for n in param_names], list(grad_args), gradient_ready_at(program, graphs.outputs, grad_args), mesh.sync_group
    )
    optimizer = torch.optim.Adam([params[n] for n in param_names], lr=lr) if lr > 0 else None
    if optimizer is not None and setup.get("optimizer_state") is not None:
        # Tensors handed to spawned workers live in shared memory: copy the state, or
        # every rank's Adam would update the same moments in place.
        import copy

        optimizer.load_state_dict(copy.deepcopy(setup["optimizer_state"]))

    def run_step(inputs: List[List[torch.Tensor]], sizes: List[Dict[str, int]], trace: bool, step: int) -> Tuple[Any, List[torch.Tensor], float]:
        # GradSync over (pp, dp): each gradient is computed on one stage of every
        # replica (and is already whole on every gp rank); the sum gives it to all.
        # Buckets are reduced while the rest of the backward runs.
        sync.start()
        result = executor.run(inputs, sizes, trace=trace, step=step, on_compute=sync.on_compute)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        for outs in result.outputs.values():
            if graphs.output_args[0] in outs:
                loss = loss + outs[graphs.output_args[0]].double()
        reduced, step_loss = sync.finish(loss)
        return result, reduced, step_loss

    losses: List[float] = []
    step_times: List[float] = []
    last_trace: List[Dict[str, Any]] = []
    last_grads: Dict[str, torch.Tensor] = {}
    last_outputs: Dict[int, Dict[str, torch.Tensor]] = {}
    step = 0
    start_epoch = setup.get("start_epoch", 0)
    m = setup["microbatches"]
    show = setup.get("progress", False) if rank == 0 else False  # None: on a terminal only
    bar = tqdm(
        total=(epochs - start_epoch) * len(batches), desc="pipeline steps", unit="step", leave=False,
        disable=None if show is None else not show,
    )
    with StepGarbageCollection() as collector:
        for epoch in range(start_epoch, epochs):
            for b, batch in enumerate(batches):
                mbs = local_microbatches(batch, m, mesh.dp_rank, dp, mesh.gp_rank, gp)
                inputs = [_flat_inputs(joint, params, buffers, mb.to(device)) for mb in mbs]
                sizes = [size_values_from_batch(mb) for mb in mbs]
                collector.between_steps()  # outside the timed window
                dist.barrier()
                t0 = time.perf_counter()
                last = epoch == epochs - 1 and b == len(batches) - 1
                result, reduced, step_loss = run_step(inputs, sizes, last, step)
                last_trace = result.trace or last_trace
                step_times.append(time.perf_counter() - t0)
                grads = dict(zip(param_names, reduced))
                losses.append(step_loss)
                if optimizer is not None:
                    for n in param_names:
                        params[n].grad = grads[n]
                    optimizer.step()
                last_grads = grads
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{step_loss:.4g}", step_ms=f"{1e3 * step_times[-1]:.0f}")
                bar.update()
                if last and return_grads and mesh.gp_rank == 0:
                    for k, outs in result.outputs.items():
                        found = {
                            name: outs[arg].cpu() for name, arg in zip(joint["output_names"], output_args) if isinstance(arg, str) and arg in outs
                        }
                        if found:
                            last_outputs[mesh.dp_rank * m + k] = found
                step += 1
            if setup.get("checkpoint") and rank == 0 and optimizer is not None:
                write_checkpoint(setup["checkpoint"], {**params, **buffers}, optimizer.state_dict(), epoch)
        bar.close()
        allocated_peak = None
        if setup.get("memory_probe") and batches:
            # one more step on the last batch, its tensor allocations recorded (no update)
            collector.between_steps()
            dist.barrier()
            _, allocated_peak = allocation_peak(lambda: run_step(inputs, sizes, False, step), device)
    return {
        "allocated_peak_bytes": allocated_peak,
        "losses": losses,
        "step_times": step_times,
        "trace": last_trace,
        "grads": {k: g.cpu() for k, g in last_grads.items()} if return_grads else None,
        "outputs": last_outputs if return_grads else None,
        "params": {k: p.cpu() for k, p in params.items()} if rank == 0 else None,
        "coordinate": mesh.coordinate,
        "grad_sync": [{"bucket": e["bucket"], "after_action": e["after_action"]} for e in sync.launched],
        "program_length": len(program.actions),
    }


# Options that only the schedule reads: a partition made under one value serves another
SCHEDULE_ONLY_OPTIONS = frozenset({"microbatches", "schedule", "chunks", "dump_dir", "max_in_flight", "memory_cap_gb", "copy_cost"})
# Options the partitions depend on but not the joint graph and its calibration: a trainer
# differing in these shares the earlier one's graphs and node times and partitions anew
# (link_gb_s: the ILP's transfer price on GPUs, `CompiledMLIP._solve`)
PARTITION_OPTIONS = frozenset(
    {"stages", "partition", "replicate", "unit_order", "transfer_charge", "ilp_time_limit_s", "rebalance", "link_gb_s"}
)


def graph_sharing_problem(like: "PipelineTrainer", model: nn.Module, loss: Any, example_mb: AtomsBatch, options: JanusOptions) -> Optional[str]:
    """Why a trainer with these arguments cannot reuse ``like``'s joint graph and
    calibration, or None.

    They depend on the model's graph, the example's sizes and fields and the loss (part of
    the joint graph), and on the options outside `SCHEDULE_ONLY_OPTIONS` and
    `PARTITION_OPTIONS` (device, calibration, the other parallel axes). The model is
    compared by its captured energy+force graph: parameters of the same shapes do not
    make the same model (a cutoff or any other plain attribute is a constant of the graph)."""
    import dataclasses

    from .passes.capture import capture_force_graph
    from .data.batch import present_targets

    if like.compiled is None or like._candidates is None or like.joint is None:
        return "it has no plan in this process (under torchrun only rank 0 plans)"
    if loss != like.loss:
        return f"the loss differs ({loss!r} against {like.loss!r})"
    sizes = size_values_from_batch(example_mb)
    if like.joint.guards.violated(sizes):
        return f"the example micro-batch's sizes {sizes} are outside its graphs' guards"
    targets = present_targets(example_mb)
    if targets != like.joint.target_fields:
        return f"the example's labels {targets} differ from its {like.joint.target_fields} (the loss reads other fields)"
    mine = capture_force_graph(model, example_mb)
    if mine.batch_fields != like.joint.batch_fields:
        return f"the example's fields {mine.batch_fields} differ from its {like.joint.batch_fields}"
    difference = graph_difference(mine, like.compiled.force_graph(example_mb))  # its cached graph: the checks above match it
    if difference:
        return f"the model differs: {difference}"
    theirs = like.compiled.options
    for f in dataclasses.fields(JanusOptions):
        if f.name not in SCHEDULE_ONLY_OPTIONS | PARTITION_OPTIONS and getattr(options, f.name) != getattr(theirs, f.name):
            return f"option {f.name!r} is {getattr(options, f.name)!r} against its {getattr(theirs, f.name)!r}"
    return None


def partition_sharing_problem(like: "PipelineTrainer", options: JanusOptions, chunks_asked: Union[int, str]) -> Optional[str]:
    """Why a trainer that may share ``like``'s graphs (`graph_sharing_problem`) must still
    partition anew, or None. M, the schedule and WaveK's in-flight limit enter the split
    only where a memory cap bounds the ILP (through the micro-batches a rank holds), so
    they must agree then."""
    if like.chunks_asked != chunks_asked:
        return f"chunks {chunks_asked!r} against its {like.chunks_asked!r}"
    theirs = like.compiled.options
    for name in sorted(PARTITION_OPTIONS):
        if getattr(options, name) != getattr(theirs, name):
            return f"option {name!r} is {getattr(options, name)!r} against its {getattr(theirs, name)!r}"
    if options.memory_cap_bytes != theirs.memory_cap_bytes:
        return f"memory cap {options.memory_cap_gb!r} GB against its {theirs.memory_cap_gb!r}: a set cap bounds the ILP"
    if options.memory_cap_bytes is not None and options.microbatches_in_flight != theirs.microbatches_in_flight:
        return (
            f"{options.microbatches_in_flight} micro-batches in flight against its {theirs.microbatches_in_flight} "
            "under a memory cap (the ILP's memory bound)"
        )
    return None


def graph_difference(a: Any, b: Any) -> Optional[str]:
    """How two captured energy+force graphs differ (code, inputs or constants), or None."""
    if (a.param_names, a.buffer_names, a.output_names) != (b.param_names, b.buffer_names, b.output_names):
        return "other parameters, buffers or outputs"
    if a.gm.code != b.gm.code:
        return "its captured graph's code differs (another architecture, or a plain attribute such as a cutoff)"
    for node in a.gm.graph.nodes:
        if node.op == "get_attr":
            x, y = getattr(a.gm, node.target), getattr(b.gm, node.target)
            same = torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x is y or x == y
            if not same:
                return f"its graph's constant {node.target} differs"
    return None


class PipelineTrainer:
    """Training of a conservative MLIP on a (pp, dp, gp) mesh of processes.

    ``schedule``: "wavek" (ours), "1f1b" (unfolded partition, the classic baseline),
    "hanayo" (wave, 2 chunks per rank), "gpipe". ``chunks``: K chunks per stage, or
    "auto" (wavek, gpipe) to partition and schedule with K = 1, 2 and 4 and keep the
    fastest in the simulator, a larger K only by more than `AUTO_CHUNKS_MARGIN` (same
    calibration, the partitions' groups timed together; ``chunks_tried`` has each
    figure).

    Started normally, the trainer spawns ``world_size`` local processes for every
    `train` / `gradients` call. Started by ``torchrun`` (one process per rank, on one or
    many nodes), every process builds the trainer and calls `train` in lock step: rank
    0 compiles, partitions and schedules, and broadcasts the result, so every rank runs
    the same graphs and programs (a partition computed on each rank could differ, as
    it is calibrated with measured times); `train` then runs this rank's share in this
    process. Results (losses, trained weights, gradients) are the same on every rank.

    ``plan_like``: a trainer built earlier for the same model graph, example sizes,
    labels and loss, whose joint graph and calibration this one reuses, and, where the
    partitioning options and ``chunks`` agree too, its partitions (every K tried, with
    their measured group times and rebalanced splits); the model's force graph is
    captured again only to compare it, and the schedule is made again. For a sweep over
    M (or a GPipe beside WaveK) the split does not depend on them, and planning it is the
    costly part; 1F1B beside WaveK shares the graph and its calibration.
    ``plan_shared`` says which: "partitions", "graphs", or None (planned alone).
    """

    def __init__(
        self,
        model: nn.Module,
        example_batch: AtomsBatch,
        loss: Optional[Any] = None,
        stages: int = 2,
        chunks: Union[int, str] = 1,
        microbatches: int = 2,
        schedule: str = "wavek",
        partition: Optional[str] = None,
        data_parallel: int = 1,
        graph_parallel: int = 1,
        timeout_s: float = 300.0,
        plan_like: Optional["PipelineTrainer"] = None,
        **options: Any,
    ) -> None:
        partition = partition or PARTITION_OF_SCHEDULE.get(schedule, "symfold")
        if schedule == "hanayo" and chunks == 1:
            chunks = 2  # Hanayo is a wave schedule: two chunks per rank
        self.chunks_asked: Union[int, str] = chunks
        self.plan_shared: Optional[str] = None  # what ``plan_like`` reused: "partitions" or "graphs"
        # (K -> partition, K -> rebalanced alternative or None, errors of the K's skipped):
        # what `_plan` solved, for a later trainer's ``plan_like``
        self._candidates: Optional[Tuple[Dict[int, Any], Dict[int, Any], List[Exception]]] = None
        if chunks == AUTO_CHUNKS and (schedule not in ("wavek", "gpipe") or partition != "symfold"):
            raise ValueError(
                f"chunks='auto' picks K for the wavek and gpipe schedules on a SymFold partition, not for "
                f"schedule={schedule!r}, partition={partition!r}: give chunks as a number"
            )
        self.model = model
        self.loss = loss if loss is not None else EnergyForceLoss()
        self.stages, self.chunks, self.microbatches, self.schedule = stages, chunks, microbatches, schedule
        self.data_parallel, self.graph_parallel = data_parallel, graph_parallel
        self.timeout_s = timeout_s
        self.step_times: List[float] = []
        self.torchrun = torchrun_world()
        if self.torchrun is not None:
            init_from_env(timeout_s, backend_for(options.get("device", "cpu")))
            if dist.get_world_size() != self.world_size:
                raise ValueError(
                    f"torchrun started {dist.get_world_size()} processes but the mesh (pp, dp, gp) = "
                    f"({stages}, {data_parallel}, {graph_parallel}) needs {self.world_size}: set --nproc-per-node "
                    "(times --nnodes) to stages x data_parallel x graph_parallel"
                )
        # Built on rank 0 only under torchrun (None elsewhere): the compiled model and plan.
        self.compiled: Optional[CompiledMLIP] = None
        self.joint = self.partition = self.dag = None
        shared: Optional[Dict[str, Any]] = None
        try:
            if self.torchrun is None or self.torchrun[0] == 0:
                shared = self._plan(model, example_batch, partition, options, plan_like)
        except Exception as exc:
            if self.torchrun is None:
                raise
            shared = {"error": f"{type(exc).__name__}: {exc}"}  # tell the other ranks, then fail too
            dist.broadcast_object_list([shared], src=0)
            raise
        if self.torchrun is not None:
            box = [shared]
            dist.broadcast_object_list(box, src=0)
            shared = box[0]
            if "error" in shared:
                raise RuntimeError(f"rank 0 could not build the training plan: {shared['error']}")
        self.graphs: StageGraphs = shared["graphs"]
        self.programs: ProgramSet = ProgramSet.from_json(shared["programs"])
        self.guards = shared["guards"]
        self.joint_meta: Dict[str, List[str]] = shared["joint"]
        self.dump_dir = shared["dump_dir"]
        self.inductor: bool = shared["inductor"]
        self.device: str = shared["device"]
        self.chunks = shared["chunks"]
        if self.dump_dir and self.dag is not None:
            self.dump_schedule(self.dump_dir)

    @property
    def chunks_tried(self) -> Dict[int, float]:
        """With chunks='auto': K -> simulated step (s) of each K tried (empty otherwise); from
        the programs, so every rank under torchrun has it."""
        return {int(k): t for k, t in self.programs.meta.get("chunks_tried", {}).items()}

    def pipeline_dag(self, partition: Any = None) -> Any:
        """The (chunk, group) DAG of ``partition`` (default: the one in use) that the
        schedule was built on: measured group times, links at the ``link_gb_s`` option,
        messages' CPU cost from ``copy_cost``."""
        from .passes.wavek import PipelineDAG

        part = partition if partition is not None else self.partition
        options = self.compiled.options
        return PipelineDAG.from_partition(
            part, self.microbatches, bandwidth_bytes_per_s=options.link_bytes_per_s,
            copy_cost=options.resolved_copy_cost(),
        )

    @staticmethod
    def _keep_faster(first: Tuple, plan_with: Callable[[int, Any], Tuple], k: int, part: Any, alternative: Any) -> Tuple[Tuple, Dict[str, Any]]:
        """The planned candidate (``plan_with``'s tuple) of ``part`` or of its rebalanced
        ``alternative``, whichever's schedule simulates faster, and what was compared."""
        from .passes.rebalance import measured_rank_times

        info: Dict[str, Any] = {
            "simulated_step_s": first[0], "rebalanced_simulated_step_s": None, "kept": False,
            "measured_rank_s": measured_rank_times(part), "rebalanced_measured_rank_s": measured_rank_times(alternative),
        }
        try:
            second = plan_with(k, alternative)
        except (PartitionError, ScheduleError) as exc:  # e.g. over the memory cap
            log.info("rebalanced split (K=%d) not schedulable: %s", k, exc)
            return first, info
        kept = second[0] < first[0]
        log.info("rebalanced split (K=%d): simulated step %.4g s against %.4g s: %s", k, second[0], first[0], "kept" if kept else "not kept")
        info.update(rebalanced_simulated_step_s=second[0], kept=kept)
        if kept:
            alternative.rebalanced_from = info["measured_rank_s"]
        return (second if kept else first), info

    def _plan(
        self, model: nn.Module, example_batch: AtomsBatch, partition: str, options: Mapping[str, Any], like: Optional["PipelineTrainer"]
    ) -> Dict[str, Any]:
        """Compile, partition and schedule (sets .compiled, .joint, .partition, .dag); what
        every rank needs to run, as one picklable dict."""
        from .passes.wavek import make_programs

        microbatches, schedule = self.microbatches, self.schedule
        example_mb = local_microbatches(example_batch, microbatches, 0, self.data_parallel, 0, 1)[0]
        auto = self.chunks == AUTO_CHUNKS
        settings = dict(
            stages=self.stages, chunks=1 if auto else self.chunks, microbatches=microbatches, schedule=schedule,
            partition=partition, data_parallel=self.data_parallel, graph_parallel=self.graph_parallel, **options,
        )
        reuse_partitions = False
        if like is not None:
            opts = JanusOptions.from_mapping(settings)
            reason = graph_sharing_problem(like, model, self.loss, example_mb, opts)
            if reason:
                raise ValueError(f"plan_like: this trainer cannot reuse that trainer's graphs: {reason}; build it without plan_like")
            anew = partition_sharing_problem(like, opts, self.chunks_asked)
            reuse_partitions = anew is None
            if anew:
                log.info("plan_like: reusing the joint graph and its calibration; partitioning again (%s)", anew)
            self.compiled = like.compiled.sharing_plans(model, opts, self.loss, partitions=reuse_partitions)
            self.plan_shared = "partitions" if reuse_partitions else "graphs"
        else:
            self.compiled = compile_model(model, example_mb, loss=self.loss, **settings)
        self.joint = self.compiled.joint_graph(example_mb)
        if like is not None and self.joint is not like.joint:  # the checks above should make this impossible
            raise RuntimeError("plan_like: the example selected another joint graph than the reused one")
        best = None
        if reuse_partitions:
            parts, alternatives, failures = like._candidates[0], like._candidates[1], list(like._candidates[2])
            log.info("plan_like: reusing the partitions of K = %s; scheduling M = %d again", sorted(parts), microbatches)
        else:
            parts, alternatives, failures = self._partition_candidates(example_mb, auto)
        self._candidates = (parts, alternatives, list(failures))

        def plan_with(k: int, part: Any) -> Tuple[float, int, Any, Any, StageGraphs, ProgramSet]:
            dag = self.pipeline_dag(part)
            graphs = StageGraphs.from_plan(part.plan)
            limits = self._wavek_limits(graphs, example_batch) if schedule == "wavek" else {}
            programs = make_programs(dag, schedule, **limits)  # validated: deadlock-free
            return programs.meta["simulated"]["makespan_s"], k, part, dag, graphs, programs

        tried: Dict[str, float] = {}
        rebalance: Dict[str, Any] = {}
        for k, part in parts.items():
            try:
                cand = plan_with(k, part)
            except (PartitionError, ScheduleError) as exc:  # no schedule within the memory cap
                log.info("K=%d skipped: %s", k, exc)
                failures.append(exc)
                continue
            if alternatives.get(k) is not None:
                cand, rebalance[str(k)] = self._keep_faster(cand, plan_with, k, part, alternatives[k])
            tried[str(k)] = cand[0]
            log.info("K=%d simulated step %.4g s", k, cand[0])
            # a larger K must be clearly faster: it crosses ranks more often, and what
            # a message costs is known less well than what compute costs
            if best is None or cand[0] < best[0] * (1 - AUTO_CHUNKS_MARGIN):
                best = cand
        if best is None:
            raise failures[-1]  # no K worked: the reason of the last one
        _, k, self.partition, self.dag, graphs, programs = best
        retimed = any(a is not None for a in alternatives.values())  # every split timed again
        if auto or like is not None or self.partition is not parts[k] or retimed:
            self.chunks = k
            self.compiled.repartition(example_mb, k, self.partition)  # the kept partition is the one in use
            self.compiled.write_partition_dump(example_mb)
        if auto:
            programs.meta["chunks_tried"] = tried
        if str(k) in rebalance:
            programs.meta["rebalance"] = rebalance[str(k)]
        return {
            "graphs": graphs,
            "programs": programs.to_json(),
            "guards": self.joint.guards,
            "joint": {
                "param_names": self.joint.param_names,
                "buffer_names": self.joint.buffer_names,
                "batch_fields": self.joint.batch_fields,
                "target_fields": self.joint.target_fields,
                "output_names": self.joint.output_names,
            },
            "dump_dir": self.compiled.options.dump_dir,
            "inductor": self.compiled.options.inductor,
            "device": self.compiled.options.device,
            "chunks": self.chunks,
        }

    def _partition_candidates(self, example_mb: AtomsBatch, auto: bool) -> Tuple[Dict[int, Any], Dict[int, Any], List[Exception]]:
        """The partitions to schedule (one per K tried), each one's rebalanced split (or
        None), and the errors of the K's that could not be partitioned."""
        failures: List[Exception] = []
        parts: Dict[int, Any] = {} if auto else {self.chunks: self.compiled.partition(example_mb)}
        for k in AUTO_CHUNK_CANDIDATES if auto else ():
            try:
                parts[k] = self.compiled.repartition(example_mb, k, time_groups=False)
            except (PartitionError, ScheduleError) as exc:  # too few units for K·P chunks, or over the memory cap
                log.info("chunks='auto': K=%d skipped: %s", k, exc)
                failures.append(exc)
        if auto and parts and self.compiled.times_groups:
            # the K's compared on times taken in one sitting: timed seconds apart,
            # the same graph differs by several per cent on a loaded machine, as much as
            # the choice is about
            self.compiled.time_groups(example_mb, list(parts.values()))
        # splits solved again where the measured groups are out of balance (all timed again
        # together if any is made); each kept only if its schedule simulates faster
        alternatives = dict(zip(parts, self.compiled.rebalanced(example_mb, list(parts.values()))))
        return parts, alternatives, failures

    def _wavek_limits(self, graphs: StageGraphs, example_batch: AtomsBatch) -> Dict[str, Any]:
        """WaveK's in-flight limit from the options: ``max_in_flight`` (a count) and/or
        ``memory_cap_gb`` (bytes per rank: the replayed peak of a rank's program, at the
        example's micro-batch sizes, plus the parameters, gradients and Adam moments that
        every rank holds), so the search keeps the fastest schedule that fits.

        ``memory_cap_gb='auto'`` (the default) is a share of each rank's device memory
        (`memory_budget.auto_memory_budget_bytes`); a cap the user set that nothing fits is
        an error, the automatic one falls back to P in flight with a warning."""
        from .memory_budget import AUTO_MEMORY, auto_memory_budget_bytes, optimizer_state_bytes
        from .passes.memory import MemoryReplay

        opts = self.compiled.options
        limits: Dict[str, Any] = {}
        if opts.max_in_flight is not None:
            limits["max_in_flight"] = opts.max_in_flight
        if opts.memory_cap_gb is None:
            return limits
        state = optimizer_state_bytes(self.model)
        auto = opts.memory_cap_gb == AUTO_MEMORY
        if auto:
            per_host = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)) if self.torchrun else self.world_size
            device_bytes = auto_memory_budget_bytes(opts.device, per_host)
            if device_bytes is None:
                return limits
            budget = device_bytes - state
            if budget <= 0:
                log.warning(
                    "memory_cap_gb='auto': parameters, gradients and Adam moments (%.3g GB) fill the %.3g GB a rank may use; "
                    "WaveK keeps P micro-batches in flight", state / 1e9, device_bytes / 1e9,
                )
                return limits
        else:
            budget = opts.memory_cap_gb * 1e9 - state
            if budget <= 0:
                raise ValueError(
                    f"memory_cap_gb={opts.memory_cap_gb} is below the {state / 1e9:.3g} GB that parameters, gradients and "
                    "Adam moments take on every rank: raise the cap"
                )
        mbs = local_microbatches(example_batch, self.microbatches, 0, self.data_parallel, 0, 1)
        sizes = [size_values_from_batch(mb) for mb in mbs]
        replay = MemoryReplay(graphs)
        limits.update(
            memory_budget_bytes=budget,
            memory_of=lambda programs: replay.peaks(programs, sizes),
            strict=not auto,
        )
        return limits

    @property
    def world_size(self) -> int:
        """Processes one run starts: stages × data_parallel × graph_parallel."""
        return self.stages * self.data_parallel * self.graph_parallel

    def check_batches(self, batches: Sequence[AtomsBatch]) -> None:
        """Fail before starting processes if a rank's share of a batch is outside the
        sizes the graphs were captured for (say, a one-structure micro-batch when the
        example had several) or cannot be split as the mesh asks."""
        for k, batch in enumerate(batches):
            for d in range(self.data_parallel):
                for g in range(self.graph_parallel):
                    for mb in local_microbatches(batch, self.microbatches, d, self.data_parallel, g, self.graph_parallel):
                        bad = self.guards.violated(size_values_from_batch(mb))
                        if bad:
                            raise BatchError(
                                f"batch {k}: a micro-batch of replica {d}, edge shard {g} has sizes "
                                f"{size_values_from_batch(mb)}, outside what the graphs were captured for ({bad}); "
                                "build the trainer from an example batch like the training batches"
                            )

    def _setup(self) -> Dict[str, Any]:
        return {
            "graphs": self.graphs,
            "programs": self.programs.to_json(),
            "joint": self.joint_meta,
            "params": {k: v.detach().clone() for k, v in self.model.named_parameters()},
            "buffers": {k: v.detach().clone() for k, v in self.model.named_buffers()},
            "microbatches": self.microbatches,
            "mesh": (self.stages, self.data_parallel, self.graph_parallel),
            "inductor": self.inductor,
            "device": self.device,
        }

    def dump_schedule(self, dump_dir: str) -> None:
        """schedule.json (all rank programs), programs/rank{r}.py, the simulated Gantt chart."""
        from pathlib import Path

        from .passes.wavek import gantt_svg, simulate
        from .runtime.program import render_python

        root = Path(dump_dir)
        (root / "programs").mkdir(parents=True, exist_ok=True)
        (root / "schedule.json").write_text(self.programs.to_json(indent=1))
        for prog in self.programs.programs:
            (root / "programs" / f"rank{prog.rank}.py").write_text(
                render_python(prog, header=[f"schedule {self.schedule}, P={self.stages}, K={self.chunks}, M={self.microbatches}"])
            )
        sim = simulate(self.programs, self.dag)
        gantt_svg(sim, str(root / "gantt_simulated.svg"), title=f"{self.schedule} (simulated, calibrated costs)")

    def _dump_measured(self, results: Sequence[Mapping[str, Any]]) -> None:
        """Chrome traces of the last step (open in Perfetto) and the measured Gantt chart."""
        import json
        from pathlib import Path

        from .passes.wavek import SimResult, Task, gantt_svg

        root = Path(self.dump_dir)
        timeline, busy = [], [0.0] * self.stages
        for rank, res in enumerate(results):
            events = res["trace"]
            (root / f"trace_rank{rank}.json").write_text(json.dumps({"traceEvents": events}))
            for e in events:
                if "args" in e:
                    start, end = e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6
                    timeline.append((rank, start, end, Task(e["args"]["chunk"], e["args"]["phase"], e["args"]["mb"])))
                    busy[rank] += end - start
        makespan = max((t[2] for t in timeline), default=0.0)
        bubble = 1.0 - sum(busy) / (self.stages * makespan) if makespan > 0 else 0.0
        measured = SimResult(makespan, busy, bubble, [0] * self.stages, [0.0] * self.stages, timeline, self.stages, self.microbatches)
        gantt_svg(measured, str(root / "gantt_measured.svg"), title=f"{self.schedule} (measured, last step)")

    def _launch(self, batches: Sequence[AtomsBatch], epochs: int, lr: float, return_grads: bool, **setup: Any) -> List[Dict[str, Any]]:
        self.check_batches(batches)
        args = ({**self._setup(), **setup}, list(batches), epochs, lr, return_grads)
        if self.torchrun is not None:
            # this process is one rank: start from rank 0's weights, run this rank's
            # share here, then share the results
            for t in list(args[0]["params"].values()) + list(args[0]["buffers"].values()):
                dist.broadcast(t, src=0)
            rank, world = self.torchrun
            mine = _train_worker(rank, world, *args)
            results: List[Any] = [None] * world
            dist.all_gather_object(results, mine)
        else:
            results = launch_local(_train_worker, self.world_size, args, timeout_s=self.timeout_s, backend=backend_for(self.device))
        self.step_times = [max(r["step_times"][k] for r in results) for k in range(len(results[0]["step_times"]))]
        if self.dump_dir and (self.torchrun is None or self.torchrun[0] == 0):
            # the pipeline of replica 0, edge shard 0: one rank per stage
            self._dump_measured([r for r in results if tuple(r["coordinate"][1:]) == (0, 0)])
        return results

    def gradients(self, batch: AtomsBatch) -> StepOutput:
        """Loss, parameter gradients and model outputs (energy, forces, stress of the
        whole batch) of one distributed step, without an update."""
        results = self._launch([batch], 1, 0.0, True)
        per_mb: Dict[int, Dict[str, torch.Tensor]] = {}
        for r in results:
            for mb, found in (r["outputs"] or {}).items():
                per_mb.setdefault(mb, {}).update(found)
        outputs = {
            name: torch.cat([per_mb[mb][name] for mb in sorted(per_mb)])
            for name in self.joint_meta["output_names"]
            if per_mb and all(name in per_mb[mb] for mb in per_mb)
        }
        return StepOutput(results[0]["losses"][0], results[0]["grads"], outputs)

    def measure_memory(self, batch: AtomsBatch) -> List[int]:
        """Peak bytes of tensors one step allocates on each rank, above what the rank held
        before it (the allocator's view, `runtime.memory_probe`): one step to warm up,
        then one recorded, without an update. What the memory replay
        (`passes.memory.program_memory`) predicts, plus the gradient buffers of GradSync."""
        results = self._launch([batch], 1, 0.0, False, memory_probe=True)
        return [int(r["allocated_peak_bytes"]) for r in results]

    def train(
        self,
        batches: Sequence[AtomsBatch],
        epochs: int = 1,
        lr: float = 1e-3,
        checkpoint: Optional[str] = None,
        resume: bool = False,
        progress: Optional[bool] = None,
    ) -> List[float]:
        """Adam training for ``epochs`` over ``batches`` in P processes; returns the loss of
        every step run and loads the trained parameters back into the eager model.

        ``checkpoint``: written (atomically) after every epoch; it loads into the eager
        model with `janus_compile.training.load_checkpoint`. ``resume``: continue from it.
        ``progress``: a progress bar of the steps (epoch, loss, step time), drawn by the
        first worker on standard error; None (default) draws it on a terminal only.
        """
        from pathlib import Path

        from .training import load_checkpoint

        setup: Dict[str, Any] = {"checkpoint": checkpoint, "progress": progress}
        if resume and checkpoint and Path(checkpoint).exists():
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            setup["start_epoch"] = load_checkpoint(checkpoint, self.model)
            setup["optimizer_state"] = state["optimizer"]
            log.info("resuming pipelined training from %s at epoch %d", checkpoint, setup["start_epoch"])
        results = self._launch(batches, epochs, lr, False, **setup)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(results[0]["params"][name])
        return results[0]["losses"]
