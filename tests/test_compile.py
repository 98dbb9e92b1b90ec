"""torch.compile(fullgraph=True) of a transformed model: no graph break, same numbers as eager."""
import copy

import pytest
import torch

import jacquant
from conftest import assert_step_matches_eager
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT


def test_compiled_forward_and_backward_equal_eager():
    torch._dynamo.reset()
    eager = jacquant.transform(TinyGPT(GPTConfig(vocab_size=64, dim=64)), bits=2, group=32, include_head=True)
    with torch.no_grad():
        for s in jacquant.sites(eager):
            s.quantizer.jac.uniform_(0.5, 1.5)  # a non-trivial B so the jacquant backward is exercised
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: any graph break raises
    assert_step_matches_eager(eager, compiled_model, compiled, torch.randint(0, 64, (2, 16)))


def test_compile_blocks_compiles_one_block_and_matches_eager(monkeypatch):
    """Regional compilation: 4 blocks, one compiled frame reused by all; loss and every gradient as eager."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("JACQUANT_FUSED_CPU", "0")  # count only the blocks' graphs, not the eager fused kernels

    torch._dynamo.reset()
    counters.clear()
    eager = jacquant.transform(TinyGPT(GPTConfig(vocab_size=64, dim=64, n_layer=4)), bits=2, group=32)
    with torch.no_grad():
        for s in jacquant.sites(eager):
            s.quantizer.jac.uniform_(0.5, 1.5)
    regional = jacquant.compile_blocks(copy.deepcopy(eager))
    idx = torch.randint(0, 64, (2, 16))
    for _ in range(2):  # the second step runs from the compiled cache
        assert_step_matches_eager(eager, regional, regional, idx)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one block compiled, 3 reuse it


def test_repeated_blocks_names_the_decoder_layers():
    name, blocks = jacquant.qat.compile.repeated_blocks(TinyGPT(GPTConfig(vocab_size=64, dim=64, n_layer=3)))
    assert name == "blocks" and len(blocks) == 3
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        jacquant.qat.compile.repeated_blocks(torch.nn.Linear(4, 4))
