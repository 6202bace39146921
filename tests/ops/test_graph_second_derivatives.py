"""The graph ops' compiled backwards have no backward of their own: a second derivative
through them must raise a clear error, never silently drop their terms, while first
derivatives taken with create_graph=True stay correct."""
import warnings

import pytest
import torch

from slsg import ops

from .helpers import needs_extension


def make_case(op):
    g = torch.Generator().manual_seed(3)
    if op == "max_relative":
        x = torch.randn(2, 10, 4, generator=g, dtype=torch.float64, requires_grad=True)
        index = torch.randint(0, 10, (2, 10, 3), generator=g)
        return x, lambda backend: ops.max_relative(x, index, backend=backend)
    q = torch.randn(2, 2, 10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    if op == "sparse_graph_attention":
        index = torch.randint(0, 10, (2, 10, 3), generator=g)
        return q, lambda backend: ops.sparse_graph_attention(q, q, q, index, backend=backend)
    return q, lambda backend: ops.dense_graph_attention(q, q, q, backend=backend)


@needs_extension
@pytest.mark.parametrize("op", ["max_relative", "sparse_graph_attention", "dense_graph_attention"])
def test_second_derivative_raises_but_first_derivative_with_create_graph_works(op):
    leaf, run = make_case(op)
    (expected,) = torch.autograd.grad(run("reference").square().sum(), leaf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" warning either
        (first,) = torch.autograd.grad(run("extension").square().sum(), leaf, create_graph=True)
    torch.testing.assert_close(first, expected)
    assert first.requires_grad
    with pytest.raises(RuntimeError, match=rf"slsg.ops.{op}: second derivatives .* backend='reference'"):
        torch.autograd.grad(first.square().sum(), leaf)
    # The suggested way out works.
    (first_ref,) = torch.autograd.grad(run("reference").square().sum(), leaf, create_graph=True)
    (second,) = torch.autograd.grad(first_ref.square().sum(), leaf)
    assert torch.isfinite(second).all()
