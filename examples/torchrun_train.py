"""Multi-process (and multi-node) training under torchrun, one process per rank.

    torchrun --standalone --nproc-per-node 8 examples/torchrun_train.py --stages 2 --data-parallel 2 --graph-parallel 2

On several nodes use torchrun's rendezvous instead of --standalone, e.g.
``--nnodes 2 --node-rank N --rdzv-backend c10d --rdzv-endpoint host0:29500``; nproc × nnodes
must equal stages × data-parallel × graph-parallel. Rank 0 compiles and schedules and
sends the plan to the others; every rank ends with the same trained weights. With
``--check`` rank 0 also trains the eager model on the same batches and compares losses.
"""
import argparse
import json

import torch
import torch.distributed as dist

from janus_compile import EnergyForceLoss
from janus_compile.data import atoms_to_batch, emt_dataset
from janus_compile.models import build_model
from janus_compile.pipeline import PipelineTrainer


def model():
    torch.manual_seed(0)
    return build_model("schnet", hidden=8, num_interactions=2, cutoff=3.5).double()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--data-parallel", type=int, default=1)
    p.add_argument("--graph-parallel", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--check", action="store_true", help="rank 0 compares the losses with eager training")
    p.add_argument("--out", default=None, help="rank 0 writes the losses here as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    structures = emt_dataset("cu", num_structures=8, seed=3, size=8)
    batches = [atoms_to_batch(structures[k : k + 4], cutoff=3.5, dtype=torch.float64) for k in (0, 4)]
    loss = EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=100.0)
    trainer = PipelineTrainer(
        model(), batches[0], loss=loss, stages=args.stages, microbatches=args.microbatches,
        data_parallel=args.data_parallel, graph_parallel=args.graph_parallel, calibrate=False,
    )
    losses = trainer.train(batches, epochs=args.epochs, lr=1e-3)
    if dist.get_rank() == 0:
        report = {"losses": losses, "world": dist.get_world_size()}
        if args.check:
            eager, expected = model(), []
            opt = torch.optim.Adam(eager.parameters(), lr=1e-3)
            for _ in range(args.epochs):
                for b in batches:
                    opt.zero_grad()
                    value = loss(eager(b), b)
                    value.backward()
                    opt.step()
                    expected.append(value.item())
            report["eager"] = expected
            worst = max(abs(a - e) / abs(e) for a, e in zip(losses, expected))
            report["max_rel_diff"] = worst
            print(f"losses {['%.6g' % x for x in losses]}; max relative difference to eager {worst:.2e}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
