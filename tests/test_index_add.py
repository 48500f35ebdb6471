"""The index_put → index_add pass: only scatter-adds along rows are rewritten, and the
sums are the same (that no captured reference model keeps an accumulating index_put is
checked in tests/test_capture.py::test_label_invariants)."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from janus_compile.passes.index_add import index_put_to_index_add

aten = torch.ops.aten


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in (aten.index_put.default, aten.index_add.default)]


def _traced(fn, *args, symbolic=True):
    return make_fx(fn, tracing_mode="symbolic" if symbolic else "real")(*args)


def test_a_scatter_add_along_rows_becomes_index_add_with_the_same_sums():
    torch.manual_seed(0)
    atoms, edges = 7, 40
    pos = torch.randn(atoms, 3, dtype=torch.float64)
    idx = torch.randint(0, atoms, (edges,))

    def backward_of_gather(pos, idx):  # what autograd writes for the gradient of pos[idx]
        return aten.index_put.default(pos.new_zeros(pos.shape), [idx], pos[idx] * 2.0, True)

    expected = backward_of_gather(pos, idx)
    for symbolic in (False, True):  # concrete sizes, and symbolic ones as the captures have
        gm = _traced(backward_of_gather, pos, idx, symbolic=symbolic)
        assert _targets(gm) == [aten.index_put.default]
        assert index_put_to_index_add(gm) == 1
        assert _targets(gm) == [aten.index_add.default]
        torch.testing.assert_close(gm(pos, idx), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "case",
    ["overwrite", "broadcast values", "bool mask", "two indices"],
)
def test_other_index_puts_are_left_alone(case):
    torch.manual_seed(0)
    idx = torch.randint(0, 5, (12,))
    x = torch.zeros(5, 3, dtype=torch.float64)
    if case == "overwrite":
        fn, args = (lambda x, i, v: aten.index_put.default(x, [i], v, False)), (x, idx, torch.randn(12, 3, dtype=torch.float64))
    elif case == "broadcast values":  # index_put broadcasts (3,) over the rows, index_add would not
        fn, args = (lambda x, i, v: aten.index_put.default(x, [i], v, True)), (x, idx, torch.randn(3, dtype=torch.float64))
    elif case == "bool mask":
        mask = torch.tensor([True, False, True, False, True])
        fn, args = (lambda x, m, v: aten.index_put.default(x, [m], v, True)), (x, mask, torch.randn(3, 3, dtype=torch.float64))
    else:
        cols = torch.randint(0, 3, (12,))
        fn, args = (lambda x, i, j, v: aten.index_put.default(x, [i, j], v, True)), (x, idx, cols, torch.randn(12, dtype=torch.float64))
    gm = _traced(fn, *args, symbolic=False)
    before = gm(*args)
    assert index_put_to_index_add(gm) == 0
    assert _targets(gm) == [aten.index_put.default]
    torch.testing.assert_close(gm(*args), before, rtol=0, atol=0)
