"""Compiled blocks (`scale: {compile: true}`): graphs must not multiply with the layer count or the KV length.

Runs dynamo with a counting backend (no Inductor, CPU): what is checked is how many graphs get traced, which is
what decides whether a compiled causal stream silently falls back to eager at the recompile limit.
"""

import pytest
import torch

from sfplus.nets.presets import build_dit, get_config
from sfplus.nets.wan import WanDiT
from sfplus.parallel import compile_blocks
from sfplus.sampling.streaming import causal_sample

STEPS = [1000.0, 750.0, 500.0, 250.0]


def _graphs_for_stream(num_layers: int) -> int:
    import dataclasses

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    net = WanDiT(dataclasses.replace(get_config("tiny"), num_layers=num_layers)).eval()
    compile_blocks(net, backend=counting_backend)
    noise = torch.randn(1, 16, 6, 4, 4)
    context = torch.randn(1, 8, 16)
    with torch.no_grad():
        compiled = causal_sample(net, noise, STEPS, {"context": context}, frames_per_block=2,
                                 generator=torch.Generator().manual_seed(0))
    return len(graphs), compiled


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_causal_stream_traces_a_layer_independent_number_of_graphs():
    two, out2 = _graphs_for_stream(2)
    four, _ = _graphs_for_stream(4)
    assert 0 < two == four  # one graph per block call type and KV length class, not per layer
    assert torch.isfinite(out2).all()


def test_compiled_stream_equals_eager():
    torch.manual_seed(0)
    net = build_dit("tiny").eval()
    noise, context = torch.randn(1, 16, 4, 4, 4), torch.randn(1, 8, 16)
    kw = dict(frames_per_block=2)
    with torch.no_grad():
        eager = causal_sample(net, noise, STEPS, {"context": context}, generator=torch.Generator().manual_seed(0), **kw)
        torch._dynamo.reset()
        compile_blocks(net, backend="eager")
        compiled = causal_sample(net, noise, STEPS, {"context": context}, generator=torch.Generator().manual_seed(0),
                                 **kw)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
