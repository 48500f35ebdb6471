"""``januspipe`` command line: demo, train, inspect, bench, plot, gp-bench, step-bench, calibrate."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

import torch

from .options import chunks_arg

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _model(args) -> torch.nn.Module:
    from .models import build_model

    kwargs = {"cutoff": args.cutoff, "num_interactions": args.layers}
    if args.model in ("schnet", "painn"):
        kwargs["hidden"] = args.hidden
    torch.manual_seed(args.seed)
    return build_model(args.model, **kwargs).to(DTYPES[args.dtype]).train()


def _add_model_args(p: argparse.ArgumentParser, model: str = "schnet") -> None:
    p.add_argument("--model", default=model, choices=["schnet", "painn", "nequip"])
    p.add_argument("--hidden", type=int, default=32, help="feature width (schnet, painn)")
    p.add_argument("--layers", type=int, default=3, help="interaction blocks")
    p.add_argument("--cutoff", type=float, default=4.5, help="neighbour cutoff in Å")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameters and data (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data shuffling (default: %(default)s)")
    p.add_argument("--dump-dir", default=None, help="write graphs and summaries here (or set JANUSPIPE_DUMP)")


def _pipeline_train_and_report(args, structures) -> int:
    """P local processes, the chosen schedule; same printout as the single-process path."""
    import statistics

    from .losses import EnergyForceLoss
    from .pipeline import PipelineTrainer
    from .training import evaluate, make_batches

    import janus_compile

    batches = make_batches(structures, args.batch_size, args.cutoff, DTYPES[args.dtype], args.seed)
    model = _model(args)
    loss = EnergyForceLoss(energy_weight=1.0, force_weight=args.force_weight, stress_weight=args.stress_weight)
    print(
        f"{args.model}: {sum(p.numel() for p in model.parameters())} parameters, {len(structures)} structures in "
        f"{len(batches)} batches; mesh (pp, dp, gp) = ({args.stages}, {args.data_parallel}, {args.graph_parallel}) "
        f"= {args.stages * args.data_parallel * args.graph_parallel} processes, schedule {args.schedule}, "
        f"{args.chunks} chunk(s) per stage, {args.microbatches} micro-batches per replica"
    )
    trainer = PipelineTrainer(
        model, batches[0], loss=loss, stages=args.stages, chunks=args.chunks, microbatches=args.microbatches,
        schedule=args.schedule, data_parallel=args.data_parallel, graph_parallel=args.graph_parallel,
        dump_dir=args.dump_dir, device=args.device, inductor=args.inductor,
    )
    part = trainer.partition
    if trainer.chunks_tried:
        print("chunks auto: " + ", ".join(f"K={k} simulated step {1e3 * t:.1f} ms" for k, t in trainer.chunks_tried.items()) + f"; K={trainer.chunks} kept")
    print(f"partition ({part.method}): max/mean rank time {part.imbalance():.3f}; simulated bubble "
          f"{100 * trainer.programs.meta['simulated']['bubble_fraction']:.1f}%")
    losses = trainer.train(batches, epochs=args.epochs, lr=args.lr, checkpoint=args.checkpoint, resume=getattr(args, "resume", False))
    steps = len(batches)
    ran = len(losses) // steps  # fewer than --epochs when resumed from a checkpoint
    print(f"{'epoch':>5} {'loss':>10}")
    for e in range(ran):
        print(f"{args.epochs - ran + e + 1:>5} {statistics.fmean(losses[e * steps:(e + 1) * steps]):>10.4g}")
    if ran == 0:
        print(f"nothing to do: the checkpoint already covers {args.epochs} epochs")
        return 0
    metrics = evaluate(janus_compile.compile(model), batches)
    median_step = statistics.median(trainer.step_times)
    per_step = statistics.fmean(b.num_structures for b in batches)
    print(
        f"E MAE {1000 * metrics['energy_mae_per_atom']:.2f} meV/atom, F MAE {1000 * metrics['force_mae']:.1f} meV/Å; "
        f"median step {1000 * median_step:.1f} ms = {per_step / median_step:.1f} structures/s"
    )
    if ran >= 2:
        first, last = statistics.fmean(losses[:steps]), statistics.fmean(losses[-steps:])
        print(f"loss {'went down' if last < first else 'did NOT go down'}: {first:.4g} -> {last:.4g}")
    return 0


def _train_and_report(args, structures) -> int:
    if max(getattr(args, "stages", 1), getattr(args, "data_parallel", 1), getattr(args, "graph_parallel", 1)) > 1:
        return _pipeline_train_and_report(args, structures)
    import janus_compile

    from .losses import EnergyForceLoss
    from .training import make_batches, train

    device = getattr(args, "device", "cpu")
    batches = [b.to(device) for b in make_batches(structures, args.batch_size, args.cutoff, DTYPES[args.dtype], args.seed)]
    model = _model(args).to(device)
    loss = EnergyForceLoss(energy_weight=1.0, force_weight=args.force_weight, stress_weight=args.stress_weight)
    compiled = janus_compile.compile(model, batches[0], loss=loss, dump_dir=args.dump_dir, inductor=getattr(args, "inductor", False))
    print(
        f"{args.model}: {sum(p.numel() for p in model.parameters())} parameters, {len(structures)} structures "
        f"in {len(batches)} batches; joint graph captured once ({len(compiled._joint_graphs[0].gm.graph.nodes)} nodes)"
    )
    history = train(compiled, batches, args.epochs, lr=args.lr, checkpoint=args.checkpoint, resume=getattr(args, "resume", False))
    print(f"{'epoch':>5} {'loss':>10} {'E MAE meV/atom':>15} {'F MAE meV/Å':>12} {'structures/s':>13}")
    for s in history:
        print(f"{s.epoch:>5} {s.loss:>10.4g} {1000 * s.energy_mae_per_atom:>15.2f} {1000 * s.force_mae:>12.1f} {s.structures_per_s:>13.1f}")
    if len(history) >= 2:
        trend = "went down" if history[-1].loss < history[0].loss else "did NOT go down"
        print(f"loss {trend}: {history[0].loss:.4g} -> {history[-1].loss:.4g}")
    return 0


def cmd_demo(args) -> int:
    from .data import emt_dataset

    print("generating (or reading cached) EMT data set: Cu, Al and CuAl, rattled, strained and MD snapshots ...")
    structures = emt_dataset("cu-al", num_structures=args.structures, seed=args.seed, size=(8, 16))
    return _train_and_report(args, structures)


def cmd_train(args) -> int:
    from .data import read_extxyz

    if args.resume and not args.checkpoint:
        raise ValueError("--resume continues from a checkpoint: name it with --checkpoint FILE")
    structures = read_extxyz(
        args.data, require_labels=True, energy_key=args.energy_key, forces_key=args.forces_key, stress_key=args.stress_key
    )
    return _train_and_report(args, structures)


def cmd_inspect(args) -> int:
    import janus_compile

    from .data import atoms_to_batch, emt_dataset, read_extxyz
    from .dump import summary

    structures = read_extxyz(args.data, index=":2") if args.data else emt_dataset("cu-al", num_structures=2, seed=args.seed)
    batch = atoms_to_batch(structures, cutoff=args.cutoff, dtype=DTYPES[args.dtype])
    dump_dir = args.dump_dir or "januspipe_dump"
    compiled = janus_compile.compile(_model(args), batch, dump_dir=dump_dir)
    print(json.dumps(summary(compiled._force_graphs[0], compiled._joint_graphs[0])["joint_graph"]["nodes_per_phase"]))
    print(f"wrote joint_graph.py, joint_graph.dot, summary.json (and more) to {dump_dir}/")
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def cmd_plot(args) -> int:
    from .bench_plots import main as plot_main

    return plot_main(args)


def cmd_step_bench(args) -> int:
    from .step_bench import main as step_bench_main

    return step_bench_main(args)


def cmd_calibrate(args) -> int:
    from .device_costs import main as calibrate_main

    return calibrate_main(args)


def cmd_gp_bench(args) -> int:
    from .bench_gp import main as gp_bench_main

    return gp_bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="januspipe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what every pass does")
    sub = parser.add_subparsers(dest="command", required=True)

    def training_args(p):
        p.add_argument("--epochs", type=int, default=8, help="passes over the data (default: %(default)s)")
        p.add_argument("--batch-size", type=int, default=4, help="structures per batch (default: %(default)s)")
        p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: %(default)s)")
        p.add_argument("--force-weight", type=float, default=10.0, help="weight of the force term of the loss (default: %(default)s)")
        p.add_argument("--stress-weight", type=float, default=0.0, help="weight of the stress term of the loss (default: %(default)s)")
        p.add_argument("--checkpoint", default=None, help="write an (atomic) checkpoint here after each epoch")
        p.add_argument("--stages", type=int, default=1, help="pipeline stages = local processes (1: single process)")
        p.add_argument("--chunks", type=chunks_arg, default=1, help="chunks per stage (K), or auto: the fastest of K = 1, 2 and 4 in the simulator, a larger K only if more than 3 %% faster (wavek, gpipe)")
        p.add_argument("--microbatches", type=int, default=4, help="micro-batches per batch and replica (M; default: %(default)s)")
        p.add_argument("--data-parallel", type=int, default=1, help="data-parallel replicas (dp)")
        p.add_argument("--graph-parallel", type=int, default=1, help="ranks sharing every micro-batch's edges (gp)")
        p.add_argument("--schedule", default="wavek", choices=["wavek", "1f1b", "hanayo", "gpipe"])
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="pipeline workers: CPU (gloo) or one GPU each (NCCL)")
        p.add_argument("--inductor", action="store_true", help="run every stage graph through TorchInductor")

    demo = sub.add_parser("demo", help="pipeline-train a reference model on built-in EMT data (4 local processes, WaveK)")
    _add_model_args(demo)
    training_args(demo)
    demo.add_argument("--structures", type=int, default=32, help="EMT structures generated (default: %(default)s)")
    demo.set_defaults(stages=4, microbatches=4, batch_size=8, epochs=6, dtype="float64")
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train on a labelled extxyz file (--stages P: P local processes)")
    tr.add_argument("data", help="extxyz file with energy and forces")
    _add_model_args(tr)
    training_args(tr)
    tr.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    tr.add_argument("--energy-key", default="energy", help="name of the energy label in the file (e.g. REF_energy)")
    tr.add_argument("--forces-key", default="forces", help="name of the per-atom force label (e.g. REF_forces)")
    tr.add_argument("--stress-key", default="stress", help="name of the stress label (e.g. REF_stress)")
    tr.set_defaults(func=cmd_train)

    ins = sub.add_parser("inspect", help="capture a model and write every graph dump")
    ins.add_argument("--data", default=None, help="extxyz file (default: built-in EMT structures)")
    _add_model_args(ins)
    ins.set_defaults(func=cmd_inspect)

    from .bench import add_bench_args

    bench = sub.add_parser("bench", help="real and simulated throughput of wavek vs 1f1b, hanayo, gpipe (tables + JSON)")
    _add_model_args(bench)
    add_bench_args(bench)
    bench.set_defaults(layers=4, func=cmd_bench)

    from .bench_plots import add_plot_args

    plot = sub.add_parser("plot", help="SVG charts of bench results: throughput and bubbles vs P, throughput and memory per rank")
    add_plot_args(plot)
    plot.set_defaults(func=cmd_plot)

    from .bench_gp import add_gp_bench_args

    gpb = sub.add_parser("gp-bench", help="graph parallelism on one large structure: step time and peak memory per gp size")
    _add_model_args(gpb)
    add_gp_bench_args(gpb)
    gpb.set_defaults(layers=2, cutoff=5.0, func=cmd_gp_bench)

    from .step_bench import add_step_bench_args

    stb = sub.add_parser(
        "step-bench", help="one device: eager double backward vs the joint graph vs the joint graph + TorchInductor (time, memory)"
    )
    add_step_bench_args(stb)
    stb.set_defaults(func=cmd_step_bench)

    from .device_costs import add_calibrate_args

    cal = sub.add_parser("calibrate", help="time each model's ops on this device (cpu or cuda) and write cost models for bench --sim-costs")
    add_calibrate_args(cal)
    cal.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime.launch import torchrun_world

    launched = torchrun_world()
    if launched is not None and launched[0] != 0:
        # under torchrun every rank runs this command; rank 0 alone reports
        import os

        sys.stdout = open(os.devnull, "w")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .errors import JanusError
    from .runtime.malloc_tuning import tune_malloc_for_tensors

    # this process times the split graphs the workers will run: the same malloc as theirs
    tune_malloc_for_tensors()

    try:
        return args.func(args)
    except (JanusError, ValueError, FileNotFoundError) as exc:
        print(f"januspipe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
