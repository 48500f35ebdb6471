"""Device placement: graphs retargeted to a worker's device, backends chosen by where
tensors live, and (on machines with GPUs) the CUDA paths against eager."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_rel_close, random_batch

import janus_compile
from janus_compile import EnergyForceLoss
from janus_compile.models import build_model
from janus_compile.options import JanusOptions, OptionsError
from janus_compile.passes.devices import retarget_devices
from janus_compile.runtime.launch import backend_for

LOSS = EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=100.0)


def _model(name: str = "painn"):
    torch.manual_seed(0)
    return build_model(name, hidden=8, num_interactions=2, num_rbf=6, cutoff=3.5).double().train()


def _on(tensors, device):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_retargeted_graph_creates_its_tensors_on_the_new_device(name):
    """Captured on the CPU, the joint graph bakes device=cpu into the tensors it creates;
    retargeted to the meta device it runs on meta inputs alone, which it cannot before."""
    model = _model(name)
    batch = random_batch(1, 3)
    graph = janus_compile.compile(model, loss=LOSS).joint_graph(batch)
    flat = graph.flat_inputs(dict(model.named_parameters()), dict(model.named_buffers()), batch)
    baked = [n for n in graph.gm.graph.nodes if isinstance(n.kwargs.get("device"), torch.device)]
    assert baked and all(n.kwargs["device"].type == "cpu" for n in baked)
    with pytest.raises(Exception):  # cpu tensors made inside meet meta inputs
        graph.gm(*_on(flat, "meta"))
    moved = retarget_devices(graph.gm, "meta")
    assert all(n.kwargs["device"] == torch.device("meta") for n in moved.graph.nodes if "device" in n.kwargs)
    outs = moved(*_on(flat, "meta"))
    assert all(o.device.type == "meta" for o in outs if isinstance(o, torch.Tensor))
    # same shapes as the real run, and the original graph is untouched
    real = graph.gm(*flat)
    assert [tuple(o.shape) for o in outs] == [tuple(o.shape) for o in real]
    assert all(n.kwargs["device"].type == "cpu" for n in baked)


def test_backend_follows_the_tensors_not_the_machine():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == "nccl"
    with pytest.raises(ValueError, match="no process-group backend for device type 'mps'"):
        backend_for("mps")


def test_device_option_is_checked():
    assert JanusOptions.from_mapping({"device": "cuda"}).device == "cuda"
    with pytest.raises(OptionsError, match="'device' must be 'cpu' or 'cuda'"):
        JanusOptions.from_mapping({"device": "cuda:1"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("inductor", [False, True])
def test_cuda_train_step_equals_eager(inductor):
    model = _model("schnet").cuda()
    batch = random_batch(2, 3).to("cuda")
    compiled = janus_compile.compile(model, loss=LOSS, inductor=inductor)
    loss, _ = compiled.train_step(batch, accumulate=False)
    ref = LOSS(model(batch), batch)
    grads = torch.autograd.grad(ref, list(model.parameters()))
    assert_rel_close(loss, ref.detach(), 1e-10, "loss")
    for (name, p), g in zip(model.named_parameters(), grads):
        assert_rel_close(p.grad, g, 1e-10, f"cuda grad {name}")


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL point-to-point needs one GPU per rank: 2 GPUs")
def test_nccl_pipeline_gradients_equal_eager():
    from janus_compile.pipeline import PipelineTrainer

    model = _model("schnet")
    batch = random_batch(3, 4)
    trainer = PipelineTrainer(model, batch, loss=LOSS, stages=2, microbatches=4, schedule="wavek", calibrate=False, device="cuda")
    out = trainer.gradients(batch)
    ref = LOSS(model(batch), batch)
    grads = torch.autograd.grad(ref, list(model.parameters()))
    assert_rel_close(torch.tensor(out.loss, dtype=torch.float64), ref.detach(), 1e-10, "loss")
    for (name, _), g in zip(model.named_parameters(), grads):
        assert_rel_close(out.grads[name], g, 1e-10, f"nccl grad {name}")
