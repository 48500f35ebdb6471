"""`janus_compile.compile`: capture without Dynamo, and the compiled model it returns.

`CompiledMLIP` behaves like the eager model (same E, F, σ; ``loss.backward()`` gives
the same parameter gradients, the double backward running through the explicit force
graph) and also offers `train_step`, which runs the joint graph: the whole training
step as one first-order graph, the form the pipeline passes cut into stages.

Graphs are valid for every batch size their guards admit; a batch outside them (say,
the example had one structure and the trace assumed so) triggers a new capture,
never a run on sizes a graph was not valid for.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .data.batch import REQUIRED_FIELDS, AtomsBatch, present_targets
from .dump import dump_graph_parallel, dump_graphs, dump_partition
from .losses import EnergyForceLoss
from .options import JanusOptions
from .passes.capture import ForceGraph, capture_force_graph
from .passes.joint import JointGraph, LossFn, build_joint_graph

log = logging.getLogger(__name__)


class CompiledMLIP(nn.Module):
    """A conservative MLIP whose energy, force and training graphs are explicit."""

    def __init__(self, model: nn.Module, options: JanusOptions, loss: Optional[LossFn] = None) -> None:
        super().__init__()
        self.model = model
        self.options = options
        self.loss = loss if loss is not None else EnergyForceLoss()
        self._force_graphs: List[ForceGraph] = []
        self._joint_graphs: List[JointGraph] = []
        self._partitions: Dict[int, Any] = {}  # id(joint graph) -> Partition
        # id(joint graph) -> its calibrated cost model; (id, sizes) -> per-node times at those sizes
        self._cost_models: Dict[int, Any] = {}
        self._node_times: Dict[Tuple[int, Tuple[Tuple[str, int], ...]], Dict[str, float]] = {}
        self._inductor: Dict[int, Any] = {}  # id(joint graph) -> its GraphModule compiled by TorchInductor
        self.graph_parallel_reports: Dict[int, Any] = {}  # id(joint graph) -> GraphParallelReport
        self._dumped = False

    def sharing_plans(self, model: nn.Module, options: JanusOptions, loss: Optional[LossFn] = None, partitions: bool = True) -> "CompiledMLIP":
        """A compiled ``model`` under ``options`` that reuses what this one captured,
        calibrated and (with ``partitions``) partitioned: graphs, node times, partitions
        with their measured group times. For plans that differ only in what comes after
        partitioning (the schedule for another M), or, without ``partitions``, in how the
        graph is split: calibration and the ILP are the costly part of planning. The
        caller checks that ``model`` captures to the same graph
        (`pipeline.graph_sharing_problem`). The caches (dicts, lists) are copied, so
        which partition each uses is its own; the graph and partition objects are shared
        and must not be changed."""
        twin = CompiledMLIP(model, options, loss if loss is not None else self.loss)
        twin._force_graphs = list(self._force_graphs)
        twin._joint_graphs = list(self._joint_graphs)
        twin._partitions = dict(self._partitions) if partitions else {}
        twin._cost_models = dict(self._cost_models)
        twin._node_times = dict(self._node_times)
        twin._inductor = dict(self._inductor)
        twin.graph_parallel_reports = dict(self.graph_parallel_reports)
        if twin._joint_graphs:
            twin._dump_once(twin._force_graphs[0], twin._joint_graphs[0])
        return twin

    def _dump_once(self, fg: ForceGraph, graph: JointGraph) -> None:
        """With ``dump_dir``, the first time: the graphs, the partition in use and the
        graph-parallel report."""
        if not self.options.dump_dir or self._dumped:
            return
        dump_graphs(self.options.dump_dir, fg, graph)
        if id(graph) in self._partitions:
            dump_partition(self.options.dump_dir, self._partitions[id(graph)], graph)
        if id(graph) in self.graph_parallel_reports:
            dump_graph_parallel(self.options.dump_dir, self.graph_parallel_reports[id(graph)], self.options.graph_parallel)
        self._dumped = True

    # -- graph selection -----------------------------------------------------------------
    def force_graph(self, batch: AtomsBatch) -> ForceGraph:
        sizes = size_values_from_batch(batch)
        for graph in self._force_graphs:
            if not graph.guards.violated(sizes) and graph.batch_fields == _present_fields(batch):
                return graph
        if self._force_graphs:
            log.info("batch sizes %s are outside the captured graphs' guards: capturing again", sizes)
        graph = capture_force_graph(self.model, batch)
        self._force_graphs.append(graph)
        return graph

    def joint_graph(self, batch: AtomsBatch) -> JointGraph:
        if hasattr(self.loss, "check"):
            self.loss.check(batch)
        sizes = size_values_from_batch(batch)
        targets = present_targets(batch)
        for graph in self._joint_graphs:
            if not graph.guards.violated(sizes) and graph.target_fields == targets:
                return graph
        fg = self.force_graph(batch)
        graph = build_joint_graph(fg, dict(self.model.named_parameters()), dict(self.model.named_buffers()), batch, self.loss)
        if self.options.graph_parallel > 1:
            # Exact in one process too: without a gp group the inserted sums are identities.
            from .passes.gp import shard_edges

            self.graph_parallel_reports[id(graph)] = shard_edges(graph.gm)
        self._joint_graphs.append(graph)
        if self._distributed:
            self._partitions[id(graph)] = self._partition(graph, batch)
        self._dump_once(fg, graph)
        return graph

    @property
    def _distributed(self) -> bool:
        """Split graphs are needed: a pipeline, or a run on several processes."""
        return self.options.pipelined or self.options.world_size > 1

    @property
    def times_groups(self) -> bool:
        """Whether partitions get measured group times: with calibration, when pipelined;
        not with inductor (the workers run compiled graphs: the node times stand in)."""
        return self.options.calibrate and self.options.pipelined and not self.options.inductor

    def time_groups(self, batch: AtomsBatch, partitions: List[Any]) -> None:
        """Set each partition's ``group_times``: its split graphs run on this batch as the
        workers run them, all partitions' runs interleaved (`passes/group_timing.py`)."""
        from .passes.group_timing import measure_group_times

        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        flat = self.joint_graph(batch).flat_inputs(params, buffers, batch)
        timed = measure_group_times([(p.plan, flat) for p in partitions], batch.positions.device, repeats=3)
        for partition, times in zip(partitions, timed):
            partition.group_times = times
            log.info(
                "group times measured: %.4g s per micro-batch (the calibrated node times sum to %.4g s)",
                sum(times.values()), sum(partition.chunk_phase_time().values()),
            )

    def rebalanced(self, batch: AtomsBatch, partitions: List[Any]) -> List[Optional[Any]]:
        """Per timed partition, a split of the same method and K solved again on node times
        corrected by its measured groups, where those measure the ranks out of balance and
        the new split differs (else None); `passes/rebalance.py`. Where any is made, every
        partition and new split is timed again in one sitting, so that the caller (the
        trainer's simulator) compares them on equal terms. Nothing with ``rebalance``
        off or without group timing."""
        from .passes.rebalance import REBALANCED_METHODS, REBALANCE_TARGET, corrected_node_times, measured_imbalance

        out: List[Optional[Any]] = [None] * len(partitions)
        if not (self.options.rebalance and self.times_groups):
            return out
        graph = self.joint_graph(batch)
        for i, part in enumerate(partitions):
            imbalance = measured_imbalance(part)
            if imbalance <= REBALANCE_TARGET or part.method not in REBALANCED_METHODS:  # one rank: always 1.0
                continue
            candidate = self._solve(graph, batch, part.chunks, corrected_node_times(part))
            same = candidate.plan.placement.chunk == part.plan.placement.chunk
            log.info(
                "rebalance (%s, K=%d): measured max/mean %.3f, solved again on corrected node times: %s",
                part.method, part.chunks, imbalance, "the same split" if same else "a new split",
            )
            out[i] = None if same else candidate
        new = [c for c in out if c is not None]
        if new:
            self.time_groups(batch, list(partitions) + new)
        return out

    def _partition(self, graph: JointGraph, batch: AtomsBatch, time_groups: bool = True):
        """SymFold (or a baseline) with per-node times calibrated on this batch and device;
        with ``time_groups``, the split graphs timed too (the schedule's costs)."""
        from .passes.cost import calibrate

        opts = self.options
        sizes = size_values_from_batch(batch)
        node_times = None
        if opts.calibrate and opts.pipelined:
            if id(graph) not in self._cost_models:
                params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
                device = batch.positions.device.type
                self._cost_models[id(graph)] = calibrate(graph, params, buffers, [batch], device=device, repeats=3)
            # a trainer sharing this graph (`sharing_plans`) may split for other sizes: the
            # model calibrated once, its times evaluated at each batch's own
            key = (id(graph), tuple(sorted(sizes.items())))
            if key not in self._node_times:
                self._node_times[key] = self._cost_models[id(graph)].times(graph.gm.graph, sizes)
            node_times = self._node_times[key]
        partition = self._solve(graph, batch, opts.chunks, node_times)
        if time_groups and self.times_groups:
            self.time_groups(batch, [partition])
        return partition

    def _solve(self, graph: JointGraph, batch: AtomsBatch, chunks: int, node_times: Optional[Mapping[str, float]]):
        """The options' partition method on ``graph`` with ``chunks`` per stage."""
        from .passes.symfold import partition_graph

        opts = self.options
        # On GPUs the ILP prices transfers at the link speed the schedule is simulated with.
        # On CPU ranks it keeps its conservative default (`PartitionProblem`): gloo moves a
        # few GB/s and every copy also takes the ranks' CPU, which the simulator charges
        # apart from the link (`copy_cost`) and the ILP does not.
        link = {"bandwidth_bytes_per_s": opts.link_bytes_per_s} if opts.device != "cpu" else {}
        # "auto" passes no charge, so partition_graph may fall back to charging once
        charge = {"transfer_charge": opts.transfer_charge} if opts.transfer_charge != "auto" else {}
        return partition_graph(
            graph.gm,
            opts.stages,
            chunks,
            opts.partition,
            node_times=node_times,
            sizes=size_values_from_batch(batch),
            time_limit_s=opts.ilp_time_limit_s,
            memory_cap_bytes=opts.memory_cap_bytes,
            microbatches_in_flight=opts.microbatches_in_flight,
            replicate=opts.replicate,
            order=opts.unit_order,
            **link,
            **charge,
        )

    def partition(self, batch: AtomsBatch):
        """The partition (units → chunks, split graphs) used for this batch's sizes (made
        now if the options did not need one, e.g. a one-process run of the trainer)."""
        graph = self.joint_graph(batch)
        if id(graph) not in self._partitions:
            self._partitions[id(graph)] = self._partition(graph, batch)
        return self._partitions[id(graph)]

    def repartition(self, batch: AtomsBatch, chunks: int, partition: Any = None, time_groups: bool = True):
        """Partition this batch's joint graph again with ``chunks`` per stage (the same
        calibration: candidates differ by their K alone), or adopt ``partition`` (made
        earlier with that K), and make it the one in use. ``time_groups=False`` leaves a
        new partition's groups untimed (for `time_groups` on several at once)."""
        opts = dataclasses.replace(self.options, chunks=chunks)
        opts.validate()
        graph = self.joint_graph(batch)
        self.options = opts
        current = self._partitions.get(id(graph))
        if partition is None:
            partition = current if current is not None and current.chunks == chunks else self._partition(graph, batch, time_groups)
        self._partitions[id(graph)] = partition
        return partition

    def write_partition_dump(self, batch: AtomsBatch) -> None:
        """Write the partition in use for this batch's sizes (after `repartition`)."""
        if self.options.dump_dir:
            graph = self.joint_graph(batch)
            dump_partition(self.options.dump_dir, self.partition(batch), graph)

    # -- running -------------------------------------------------------------------------
    def forward(self, batch: AtomsBatch) -> Dict[str, torch.Tensor]:
        """E, F (σ) through the explicit force graph, differentiable for training."""
        graph = self.force_graph(batch)
        return graph(dict(self.model.named_parameters()), dict(self.model.named_buffers()), batch)

    def train_step(self, batch: AtomsBatch, accumulate: bool = True) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss and outputs of one step; parameter gradients added to ``.grad``."""
        graph = self.joint_graph(batch)
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            if self._distributed:
                # Reference execution of the split graphs, in dependency order, in this process.
                outs = self._partitions[id(graph)].plan.run(graph.flat_inputs(params, buffers, batch))
                loss, outputs, grads = graph.unflatten(outs)
            elif self.options.inductor:
                loss, outputs, grads = graph.unflatten(self._inductor_graph(graph)(*graph.flat_inputs(params, buffers, batch)))
            else:
                loss, outputs, grads = graph(params, buffers, batch)
            for name, g in grads.items():
                p = params[name]
                if p.grad is None or not accumulate:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        return loss, outputs


    def _inductor_graph(self, graph: JointGraph):
        """The joint graph compiled by TorchInductor (once per captured graph). Once the
        force graph is explicit the training step is a first-order graph, which stock
        compilers handle; they cannot compile the double backward of the eager model."""
        if id(graph) not in self._inductor:
            self._inductor[id(graph)] = compile_with_inductor(graph.gm)
        return self._inductor[id(graph)]


_SIZE_QUERIES = {torch.ops.aten.sym_size.int: "size", torch.ops.aten.sym_numel.default: "numel"}


def _single_row_target(node: torch.fx.Node, dim: int) -> bool:
    """Whether the tensor ``node`` accumulates into has exactly one row along ``dim``."""
    val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    shape = getattr(val, "shape", None)
    return shape is not None and len(shape) > dim and isinstance(shape[dim], int) and shape[dim] == 1


def _ndim(node: Any) -> Optional[int]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _sum_into_single_rows(graph: torch.fx.Graph) -> None:
    """Scatter-adds into a target of one row (per-structure sums of a one-structure batch,
    whose size tracing fixed to 1) as plain sums: every index is 0, so
    ``index_add(x, d, i, src) = x + src.sum(d, keepdim=True)``, and the same for
    ``index_put(x, [i], v, accumulate=True)`` along dim 0. Inductor's vectorised CPU code
    for an atomic add with a constant index fails an internal assertion when it runs on
    more than one thread (torch 2.13); a sum avoids the atomic add altogether."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.index_add.default and len(node.args) >= 4 and _single_row_target(node, int(node.args[1])):
            x, dim, _, src = node.args[:4]
            alpha = node.kwargs.get("alpha", 1)
        elif (
            node.target is aten.index_put.default and len(node.args) >= 4 and node.args[3] is True
            and len(node.args[1]) == 1 and _single_row_target(node, 0)
        ):
            x, _, src, _ = node.args[:4]
            dim, alpha = 0, 1
            # values broadcast to (len(index), *x.shape[1:]); summing over the index dim
            # needs that dim present
            if _ndim(src) is None or _ndim(src) != _ndim(x):
                continue
        else:
            continue
        with graph.inserting_before(node):
            total = graph.call_function(aten.sum.dim_IntList, (src, [dim], True))
            if alpha != 1:
                total = graph.call_function(aten.mul.Tensor, (total, alpha))
            summed = graph.call_function(aten.add.Tensor, (x, total))
        summed.meta = dict(node.meta)
        node.replace_all_uses_with(summed)
        graph.erase_node(node)


def compile_with_inductor(gm: torch.fx.GraphModule) -> Callable[..., Any]:
    """``gm`` through TorchInductor, compiled on the first call with dynamic sizes: every
    training batch has its own atom and edge counts, and one kernel set serves them all.

    Symbolic tracing recorded size queries as ``aten.sym_size`` / ``aten.sym_numel`` ops,
    which Dynamo refuses to trace (an op returning a non-tensor); a copy of the graph asks
    the tensor instead (``x.size(d)``, ``x.numel()``), the same values. Scatter-adds into
    one row become sums (`_sum_into_single_rows`)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _SIZE_QUERIES:
            with graph.inserting_before(node):
                query = graph.call_method(_SIZE_QUERIES[node.target], node.args, node.kwargs)
            query.meta = dict(node.meta)
            node.replace_all_uses_with(query)
            graph.erase_node(node)
    _sum_into_single_rows(graph)
    graph.lint()
    return torch.compile(torch.fx.GraphModule(gm, graph), backend="inductor", dynamic=True, fullgraph=True)


def _present_fields(batch: AtomsBatch) -> List[str]:
    return [f for f in REQUIRED_FIELDS if getattr(batch, f) is not None]


def size_values_from_batch(batch: AtomsBatch) -> Dict[str, int]:
    sizes = {}
    if batch.positions is not None:
        sizes["atoms"] = batch.num_atoms
    if batch.edge_index is not None:
        sizes["edges"] = batch.num_edges
    if batch.cell is not None:
        sizes["structures"] = batch.num_structures
    return sizes


def compile(
    model: nn.Module,
    example_batch: Optional[AtomsBatch] = None,
    loss: Optional[LossFn] = None,
    **options: Any,
) -> CompiledMLIP:
    """Capture ``model`` without Dynamo (works for models Dynamo cannot trace, e.g. e3nn).

    ``options`` are the backend options (stages, chunks, microbatches, schedule,
    partition, dump_dir, ...). With an ``example_batch`` the graphs are captured now (and
    dumped); otherwise on the first call. With ``stages × chunks > 1`` the joint graph is
    partitioned (SymFold by default) and `train_step` runs the split (chunk, phase)
    graphs one after another in this process: the reference the distributed runtime
    must match.
    """
    opts = JanusOptions.from_mapping(options)
    compiled = CompiledMLIP(model, opts, loss)
    if example_batch is not None:
        compiled.force_graph(example_batch)
        required = getattr(compiled.loss, "required_targets", lambda: ("energy", "forces"))()
        if all(getattr(example_batch, t) is not None for t in required):
            compiled.joint_graph(example_batch)
        elif opts.dump_dir:
            dump_graphs(opts.dump_dir, compiled._force_graphs[0], None)
    return compiled
