"""jacquant.calibrate: GPTQ block by block on a tiny Llama, against a hand-built reference for the first
block (its Hessian from the input of q_proj taken by a plain forward hook) and RTN's error on every site."""
import copy

import pytest
import torch

import jacquant
from jacquant.calibration.blocks import ActivationCache
from jacquant.primitives.gptq import gptq_quantize

from conftest import tiny_llama


def _data(n=8, t=24, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def _model(bits=2, group=32):
    torch.manual_seed(0)
    fp = tiny_llama()
    return fp, jacquant.transform(copy.deepcopy(fp), bits=bits, group=group, method="ste")


SHARED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def test_every_site_equals_gptq_on_hessians_from_plain_forward_hooks_and_beats_rtn():
    """Reference for block i: the calibrated model with block i put back to its RTN start, run with forward
    hooks on block i's layers (their inputs after blocks 0..i-1 were calibrated, before block i was);
    GPTQ of each input-sharing stack of weights against that H must equal what calibrate wrote."""
    fp, q = _model()
    start = copy.deepcopy(q)
    x = _data()
    report = jacquant.calibrate(q, list(x.split(4)), progress=False)
    for i in range(2):
        probe = copy.deepcopy(q)
        probe.model.layers[i].load_state_dict(start.model.layers[i].state_dict())
        layer = probe.model.layers[i]
        acts = {names: [] for names in SHARED}
        hooks = [layer.get_submodule(names[0]).register_forward_pre_hook(
            lambda m, a, names=names: acts[names].append(a[0].reshape(-1, a[0].shape[-1]))) for names in SHARED]
        with torch.no_grad():
            for b in x.split(4):
                probe(input_ids=b, use_cache=False)
        for h in hooks:
            h.remove()
        for names in SHARED:
            a = torch.cat(acts[names]).double()
            w = torch.cat([layer.get_submodule(n).weight.detach() for n in names])
            want, want_s, _ = gptq_quantize(w, a.t() @ a, 2, 32, stored_scale=lambda s: s.half().float())
            got = torch.cat([q.model.layers[i].get_submodule(n).weight.detach() for n in names])
            got_s = torch.cat([q.model.layers[i].get_submodule(n).weight_quantizer.scale.detach() for n in names])
            # the two Hessians differ in summation order only; GPTQ's error feedback carries that to ~5e-5 here
            torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4, msg=f"layer {i} {names}")
            # fp16 scales: a group whose fitted scale sits at an fp16 rounding boundary may differ by one ulp (2^-11)
            torch.testing.assert_close(got_s, want_s, rtol=2.0 ** -10, atol=1e-7, msg=f"layer {i} {names} scales")
    assert len(report) == 14 and {r["block"] for r in report} == {0, 1}
    for r in report:
        assert r["gptq_error"] < r["rtn_error"], r


def test_calibration_lowers_the_output_error_of_the_whole_model_and_a_disk_cache_changes_nothing():
    fp, q = _model()
    q_disk = copy.deepcopy(q)
    x = _data(n=16)
    with torch.no_grad():
        ref = fp(input_ids=x).logits
        err_rtn = (q(input_ids=x).logits - ref).pow(2).mean()
    jacquant.calibrate(q, list(x.split(4)), progress=False)
    jacquant.calibrate(q_disk, list(x.split(4)), progress=False, max_cache_bytes=1)  # memory-mapped cache
    with torch.no_grad():
        err = (q(input_ids=x).logits - ref).pow(2).mean()
        assert torch.equal(q(input_ids=x).logits, q_disk(input_ids=x).logits)
    assert err < 0.7 * err_rtn


def test_activation_cache_spills_to_a_file_and_deletes_it():
    c = ActivationCache(4, 3, 2, max_bytes=10)
    assert c.on_disk
    path = c.path
    c.write(1, torch.ones(2, 3, 2))
    assert c.read(slice(0, 4)).sum() == 12
    c.close()
    import os
    assert not os.path.exists(path)
    with pytest.raises(ValueError, match="do not fit"):
        ActivationCache(2, 3, 2).write(1, torch.ones(2, 3, 2))


def test_calibrate_refuses_an_untransformed_model_and_no_data():
    fp, q = _model()
    with pytest.raises(ValueError, match="transform it with jacquant.transform"):
        jacquant.calibrate(fp, list(_data().split(4)))
    with pytest.raises(ValueError, match="no calibration batch"):
        jacquant.calibrate(q, [])


def test_gguf_q4_0_sites_calibrate_on_their_fp16_grid_and_scale_and_min_sites_are_refused():
    torch.manual_seed(0)
    fp = tiny_llama()
    q = jacquant.transform(copy.deepcopy(fp), format="q4_0", method="ste")
    x = _data()
    with torch.no_grad():
        ref = fp(input_ids=x).logits
        err_rtn = (q(input_ids=x).logits - ref).pow(2).mean()
    report = jacquant.calibrate(q, list(x.split(4)), progress=False)
    for s in jacquant.sites(q):
        qq = s.quantizer
        assert torch.equal(qq.scale, qq.scale.half().float()), s.name  # stored as fp16 holds it: the exported grid
        assert (qq.zero_point == 8).all()
    with torch.no_grad():
        assert (q(input_ids=x).logits - ref).pow(2).mean() < err_rtn
    assert all(r["gptq_error"] < r["rtn_error"] for r in report)
    affine = jacquant.transform(copy.deepcopy(fp), format="q4_1", method="ste")
    with pytest.raises(ValueError, match="nothing to calibrate"):
        jacquant.calibrate(affine, list(x.split(4)))
    mixed = jacquant.transform(copy.deepcopy(fp), format=lambda name, m: "q4_1" if "down_proj" in name else "q4_0",
                               method="ste")
    down = {n: p.detach().clone() for n, p in mixed.named_parameters() if "down_proj" in n}
    with pytest.warns(UserWarning, match="2 scale-and-min GGUF sites"):
        rows = jacquant.calibrate(mixed, list(x.split(4)), progress=False)
    assert sum("skipped" in r for r in rows) == 2 and sum("gptq_error" in r for r in rows) == 12
    assert all(torch.equal(p, down[n]) for n, p in mixed.named_parameters() if "down_proj" in n)
