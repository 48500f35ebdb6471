"""The README's example: compile a reference MLIP both ways and check it against eager."""
import tempfile

import torch

import janus_compile
from janus_compile.data import atoms_to_batch, emt_dataset
from janus_compile.models import build_model

model = build_model("schnet", hidden=32, num_interactions=3, cutoff=4.5).double()
batch = atoms_to_batch(emt_dataset("cu-al", num_structures=4), cutoff=4.5)
loss_fn = janus_compile.EnergyForceLoss()

# 1. as a torch.compile backend
compiled = torch.compile(model, backend="januspipe")
out = compiled(batch)
loss = loss_fn(out, batch)
loss.backward()  # the double backward runs through JanusPipe's explicit force graph
grads = [p.grad.clone() for p in model.parameters()]

# 2. without Dynamo: the whole training step as one joint graph
model.zero_grad()
jc = janus_compile.compile(model, batch, loss=loss_fn, dump_dir=tempfile.mkdtemp(prefix="januspipe_"))
loss2, out2 = jc.train_step(batch)

reference = model(batch)
worst = max((a - b).abs().max().item() / b.abs().max().item() for a, b in zip(grads, [p.grad for p in model.parameters()]))
print(f"loss {loss.item():.6f} (torch.compile) vs {loss2.item():.6f} (joint graph) vs {loss_fn(reference, batch).item():.6f} (eager)")
print(f"forces max |diff| vs eager: {(out['forces'] - reference['forces']).abs().max().item():.2e}")
print(f"parameter gradients, max relative difference between the two paths: {worst:.2e}")
print(f"dumps in {jc.options.dump_dir}")
