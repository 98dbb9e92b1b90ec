"""torch.compile(fullgraph=True) of a transformed model: no graph break, same numbers as eager."""
import copy

import torch

import jacquant
from jacquant.tiny_gpt import GPTConfig, TinyGPT, lm_loss


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_compiled_forward_and_backward_equal_eager():
    torch._dynamo.reset()
    eager = jacquant.transform(TinyGPT(GPTConfig(vocab_size=64, dim=64)), bits=2, group=32, include_head=True)
    with torch.no_grad():
        for s in jacquant.sites(eager):
            s.quantizer.jac.uniform_(0.5, 1.5)  # a non-trivial B so the jacquant backward is exercised
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: any graph break raises
    idx = torch.randint(0, 64, (2, 16))
    loss_e = lm_loss(eager(idx), idx)
    loss_e.backward()
    loss_c = lm_loss(compiled(idx), idx)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    ge, gc = _grads(eager), _grads(compiled_model)
    assert ge.keys() == gc.keys() and any("scale" in k for k in ge)
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-5, atol=1e-6, msg=k)
