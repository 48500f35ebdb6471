"""torch.compile(model, backend="januspipe"): same E, F, stress and training gradients as eager."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import assert_rel_close, random_batch

from janus_compile import EnergyForceLoss
from janus_compile.models import build_model

LOSS = EnergyForceLoss(energy_weight=1.0, force_weight=10.0, stress_weight=100.0)


def _model(name):
    torch.manual_seed(0)
    return build_model(name, hidden=8, num_interactions=2, num_rbf=6, cutoff=3.5).double().train()


def _run_python_prints_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter (what it imports is its own) and expect 'ok'."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_dynamo_backend_matches_eager_and_does_not_recompile_per_size(name):
    import janus_compile.backend as backend

    torch._dynamo.reset()
    model = _model(name)
    calls = []
    original = backend.januspipe_backend

    def counting(gm, example_inputs, **kw):
        calls.append(len(gm.graph.nodes))
        return original(gm, example_inputs, **kw)

    compiled = torch.compile(model, backend=counting)
    params = list(model.parameters())
    counts = []
    for k, (seed, n_structures) in enumerate([(1, 2), (2, 3), (3, 4), (4, 3), (5, 2)]):
        batch = random_batch(seed, n_structures)
        out = compiled(batch)
        ref = model(batch)
        for key in ("energy", "forces", "stress"):
            assert_rel_close(out[key].detach(), ref[key].detach(), 1e-10, f"{name} {key}")
        got = torch.autograd.grad(LOSS(out, batch), params, allow_unused=True)
        want = torch.autograd.grad(LOSS(ref, batch), params, allow_unused=True)
        for p, g, w in zip(params, got, want):
            if w is None:
                continue
            assert_rel_close(g, w, 1e-10, f"{name} grad {tuple(p.shape)}")
        counts.append(len(calls))
    # Dynamo recompiles once to go dynamic; after that new sizes reuse the graphs.
    assert counts[-1] == counts[2], counts


def test_backend_resolves_by_name_without_import():
    code = (
        "import torch\n"
        "def f(x):\n"
        "    return (x * x).sum()\n"
        "g = torch.compile(f, backend='januspipe')\n"
        "x = torch.randn(3, requires_grad=True)\n"
        "y = g(x); y.backward()\n"
        "assert torch.allclose(x.grad, 2 * x)\n"
        "import sys; assert 'janus_compile' in sys.modules\n"
        "print('ok')\n"
    )
    _run_python_prints_ok(code)


def test_backend_resolves_by_name_from_a_source_checkout_without_entry_point():
    """A checkout on sys.path has no entry point: importing the package registers it."""
    code = (
        "import importlib.metadata as md\n"
        "md.entry_points = lambda **kw: md.EntryPoints(())\n"  # as if not installed
        "import torch, janus_compile\n"
        "from torch._dynamo.backends.registry import _COMPILER_FNS\n"
        "assert 'januspipe' in _COMPILER_FNS, sorted(_COMPILER_FNS)\n"
        "g = torch.compile(lambda x: (x * x).sum(), backend='januspipe')\n"
        "x = torch.randn(3, requires_grad=True)\n"
        "g(x).backward()\n"
        "assert torch.allclose(x.grad, 2 * x)\n"
        "print('ok')\n"
    )
    _run_python_prints_ok(code)


def test_the_command_line_starts_without_dynamo_and_public_names_load_on_use():
    """`januspipe --help` and argument errors should not wait for torch._dynamo."""
    code = (
        "import sys\n"
        "import janus_compile, janus_compile.cli\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "assert 'janus_compile.compiled' not in sys.modules\n"
        "from janus_compile import compile, JanusError, AtomsBatch, januspipe_backend\n"
        "from janus_compile.compiled import compile as direct\n"
        "assert compile is direct and callable(januspipe_backend)\n"
        "assert set(janus_compile.__all__) <= set(dir(janus_compile))\n"
        "try:\n"
        "    janus_compile.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print('ok')\n"
    )
    _run_python_prints_ok(code)


def test_backend_rejects_unknown_options():
    from janus_compile import OptionsError

    g = torch.compile(lambda x: x * 2, backend="januspipe", options={"nope": 1})
    with pytest.raises(Exception) as info:
        g(torch.randn(2))
    assert "nope" in str(info.value)
