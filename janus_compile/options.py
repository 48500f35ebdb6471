"""Options of the `januspipe` backend and of `janus_compile.compile`, checked up front."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping, Optional, Tuple, Union

from .errors import JanusError
from .memory_budget import AUTO_MEMORY

if TYPE_CHECKING:
    from .passes.copy_cost import CopyModel

log = logging.getLogger(__name__)

SCHEDULES = ("wavek", "1f1b", "hanayo", "gpipe")
PARTITIONS = ("symfold", "even", "unfolded")
REPLICATE = ("auto", "always", "never")
UNIT_ORDERS = ("auto", "chain", "dag")
TRANSFER_CHARGE_OPTIONS = ("auto", "per_chunk", "once")  # JanusOptions.transfer_charge


class OptionsError(JanusError, ValueError):
    """An option has an unknown name or a value out of range."""


AUTO_CHUNKS = "auto"  # PipelineTrainer(chunks='auto'): simulate K = 1, 2 and 4, keep the fastest

AUTO_LINK = "auto"
LINK_GB_S_AUTO = {"cpu": 25.0, "cuda": 25.0}
"""GB/s between two ranks that ``link_gb_s="auto"`` assumes: NVLink class. On CPU,
gloo over TCP moved 2.4–3.5 GB/s one way between two otherwise idle processes here
(1–50 MB tensors), and each copy also takes CPU from the ranks' compute; yet 1 GB/s as
the CPU default made things worse overall. It ranked K = 1 and K = 2 of SchNet (1008
atoms, P = 2) better (K = 2 at 0.93 / 1.00 / 0.99 of K = 1's simulated step for
M = 2 / 4 / 8 instead of 0.89 / 0.90 / 0.95; it ran at 0.97–0.99 / 1.04 / 1.10), but
orders list-scheduled around 1 GB/s transfers ran slower (Hanayo's by about a quarter):
what a CPU copy costs is compute time, not a slower link (the ``copy_cost`` option)."""

AUTO_COPY = "auto"
CopyCostOption = Union[str, None, Tuple[float, float, float]]


def chunks_arg(text: str) -> Any:
    """Command-line K: a positive number or 'auto'."""
    if text == AUTO_CHUNKS:
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"chunks must be a positive integer or {AUTO_CHUNKS!r}, got {text!r}")
    return value


@dataclass
class JanusOptions:
    """What the user can set; the README's options table says what each means.

    stages (P), chunks per stage (K) and microbatches (M) describe the pipeline;
    ``data_parallel`` (replicas, each with its own M micro-batches) and
    ``graph_parallel`` (ranks sharing the edges of every micro-batch) the other two
    axes of the (pp, dp, gp) mesh;
    ``dump_dir`` (or env ``JANUSPIPE_DUMP``) receives every intermediate artefact.
    """

    stages: int = 1
    chunks: int = 1
    microbatches: int = 1
    data_parallel: int = 1
    graph_parallel: int = 1
    schedule: str = "wavek"
    partition: str = "symfold"
    replicate: str = "auto"  # recompute geometry on the chunks that read it: auto / always / never
    unit_order: str = "auto"  # SymFold chunks: contiguous runs of units (chain), any data-flow order (dag), or dag when the chain misses max/mean 1.10 (auto)
    # how the SymFold ILP charges a value read on a later chunk: one transfer per chunk it
    # crosses (per_chunk), one per cut edge as the runtime sends it (once), or auto: per
    # chunk, solved again charged once where that misses max/mean 1.10 (docs/partitioning.md)
    transfer_charge: str = "auto"
    ilp_time_limit_s: float = 30.0
    # per rank: a number bounds the ILP and WaveK's in-flight search; "auto" lets WaveK fill a
    # share of the rank's device memory (memory_budget.py); None keeps the count of P in flight
    memory_cap_gb: Union[float, str, None] = AUTO_MEMORY
    max_in_flight: Optional[int] = None  # WaveK: micro-batches in flight per rank (default P; min(M, 3P) with a memory cap)
    # GB/s between two pipeline ranks in the schedule's simulator, and on GPUs the ILP's
    # price of a byte too (on CPU ranks the ILP keeps its own, `PartitionProblem`);
    # "auto": LINK_GB_S_AUTO of the device (gloo over TCP on CPU, NVLink-class on GPU)
    link_gb_s: Union[float, str] = AUTO_LINK
    # CPU time each message costs the rank that sends it and the one that receives it, in
    # that simulator: "auto" measures it on CPU ranks (runtime/copy_probe.py, kept a day
    # on disk; nothing on GPUs or with calibrate=False), None charges nothing, or
    # (µs per message, µs per tensor, GB/s) sets it
    copy_cost: CopyCostOption = AUTO_COPY
    calibrate: bool = True
    # solve the partition again, on node times corrected by the measured groups, where those
    # measure the ranks out of balance (passes/rebalance.py; needs calibrate)
    rebalance: bool = True
    device: str = "cpu"  # pipeline workers: "cpu" (gloo) or "cuda" (one GPU per process, NCCL)
    inductor: bool = False  # run the joint graph (one process) or each stage graph (workers) through TorchInductor
    dump_dir: Optional[str] = None

    @staticmethod
    def from_mapping(options: Optional[Mapping[str, Any]]) -> "JanusOptions":
        options = dict(options or {})
        known = {f.name for f in fields(JanusOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionsError(f"unknown januspipe option(s) {unknown}; known options: {sorted(known)}")
        opts = JanusOptions(**options)
        if opts.dump_dir is None and os.environ.get("JANUSPIPE_DUMP"):
            opts.dump_dir = os.environ["JANUSPIPE_DUMP"]
        opts.validate()
        return opts

    def validate(self) -> None:
        for name in ("stages", "chunks", "microbatches", "data_parallel", "graph_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                hint = " (PipelineTrainer and --chunks also take 'auto', in lower case)" if name == "chunks" else ""
                raise OptionsError(f"option {name!r} must be a positive integer{hint}, got {value!r}")
        if self.partition not in PARTITIONS:
            raise OptionsError(f"option 'partition' must be one of {PARTITIONS}, got {self.partition!r}")
        if self.partition == "unfolded" and self.chunks != 1:
            raise OptionsError("partition='unfolded' (the 1F1B baseline) has one chunk per stage: set chunks=1")
        if self.replicate not in REPLICATE:
            raise OptionsError(f"option 'replicate' must be one of {REPLICATE}, got {self.replicate!r}")
        if self.unit_order not in UNIT_ORDERS:
            raise OptionsError(f"option 'unit_order' must be one of {UNIT_ORDERS}, got {self.unit_order!r}")
        if self.transfer_charge not in TRANSFER_CHARGE_OPTIONS:
            raise OptionsError(f"option 'transfer_charge' must be one of {TRANSFER_CHARGE_OPTIONS}, got {self.transfer_charge!r}")
        for name in ("rebalance", "calibrate"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"option {name!r} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.ilp_time_limit_s, bool) or not isinstance(self.ilp_time_limit_s, (int, float)):
            raise OptionsError(f"option 'ilp_time_limit_s' must be a number of seconds, got {self.ilp_time_limit_s!r}")
        if self.ilp_time_limit_s <= 0:
            raise OptionsError(f"option 'ilp_time_limit_s' must be positive, got {self.ilp_time_limit_s!r}")
        if self.max_in_flight is not None and (not isinstance(self.max_in_flight, int) or self.max_in_flight < 1):
            raise OptionsError(f"option 'max_in_flight' must be a positive integer or None, got {self.max_in_flight!r}")
        cap = self.memory_cap_gb
        if cap is not None and cap != AUTO_MEMORY and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise OptionsError(
                f"option 'memory_cap_gb' must be a positive number (GB per rank), {AUTO_MEMORY!r} (a share of each rank's "
                f"device memory) or None (at most P micro-batches in flight), got {cap!r}"
            )
        link = self.link_gb_s
        if link != AUTO_LINK and (isinstance(link, bool) or not isinstance(link, (int, float)) or not link > 0):
            raise OptionsError(
                f"option 'link_gb_s' must be a positive number (GB/s between two ranks) or {AUTO_LINK!r} "
                f"({', '.join(f'{v:g} on {k}' for k, v in LINK_GB_S_AUTO.items())}), got {link!r}"
            )
        copy = self.copy_cost
        if copy is not None and copy != AUTO_COPY and not _is_copy_triple(copy):
            raise OptionsError(
                f"option 'copy_cost' must be {AUTO_COPY!r} (measured on CPU ranks), None (not charged) or a triple "
                f"(µs per message >= 0, µs per tensor >= 0, GB/s > 0) such as (200, 20, 3), got {copy!r}"
            )
        if not isinstance(self.device, str) or self.device not in ("cpu", "cuda"):
            raise OptionsError(
                f"option 'device' must be 'cpu' or 'cuda' (each pipeline worker then takes its own GPU), got {self.device!r}"
            )
        if not isinstance(self.inductor, bool):
            raise OptionsError(f"option 'inductor' must be True or False, got {self.inductor!r}")
        if self.schedule not in SCHEDULES:
            raise OptionsError(f"option 'schedule' must be one of {SCHEDULES}, got {self.schedule!r}")

    @property
    def pipelined(self) -> bool:
        return self.stages * self.chunks > 1

    @property
    def microbatches_in_flight(self) -> int:
        """What a rank holds at once, for the partitioner's memory estimate: every
        micro-batch under GPipe, otherwise the in-flight cap (P unless set)."""
        if self.schedule == "gpipe":
            return self.microbatches
        return min(self.microbatches, self.max_in_flight or self.stages)

    @property
    def memory_cap_bytes(self) -> Optional[float]:
        """A cap the user set, in bytes (None for 'auto' and None): what bounds the ILP."""
        cap = self.memory_cap_gb
        return None if cap is None or cap == AUTO_MEMORY else float(cap) * 1e9

    @property
    def link_bytes_per_s(self) -> float:
        """The link bandwidth in bytes/s ('auto' resolved by the device)."""
        if self.link_gb_s == AUTO_LINK:
            return LINK_GB_S_AUTO.get(self.device, LINK_GB_S_AUTO["cuda"]) * 1e9
        return float(self.link_gb_s) * 1e9

    def resolved_copy_cost(self) -> "CopyModel":
        """The copy cost the simulator charges ('auto': the probe's, on CPU ranks that
        calibrate; it runs two processes for ~20 s the first time on a machine each day)."""
        from .passes.copy_cost import CopyCost
        from .runtime.copy_probe import measure_copy_cost

        copy = self.copy_cost
        if copy is None:
            return CopyCost()
        if copy == AUTO_COPY:
            if self.device != "cpu" or not self.calibrate or not self.pipelined:
                return CopyCost()
            try:
                return measure_copy_cost()
            except Exception as exc:  # a calibration aid: the schedule is still valid without it
                log.warning("the copy-cost probe failed (%s); messages are not charged in the simulator", exc)
                return CopyCost()
        per_message_us, per_tensor_us, gb_s = copy
        return CopyCost(float(per_message_us) / 1e6, float(per_tensor_us) / 1e6, 1 / (float(gb_s) * 1e9))

    @property
    def world_size(self) -> int:
        """Processes of one training run: pp × dp × gp."""
        return self.stages * self.data_parallel * self.graph_parallel


def _is_copy_triple(value: Any) -> bool:
    """(µs per message, µs per tensor, GB/s): real numbers, the first two >= 0, the last > 0."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        return False
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        return False
    return value[0] >= 0 and value[1] >= 0 and value[2] > 0
