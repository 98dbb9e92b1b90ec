"""app.recipes and app.train: recipes put B where they say, the loop is deterministic, and RTN is the initial grid."""
import pytest
import torch

import jacquant
from jacquant.app import recipes as qat_recipes
from jacquant.app import train as qat
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT, lm_loss


def _setup():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=64, dim=64, n_layer=1))
    batches = [torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    return model, batches


def _run(recipe, model, batches, seed=0):
    q = qat.quantize_copy(model, recipe, jacquant.QuantConfig(bits=2, group=32))
    curve = qat.train(q, recipe, iter(batches), lambda m, b: lm_loss(m(b), b), len(batches), 3e-3, seed=seed,
                      calib_batch=batches[0])
    return q, curve


@pytest.mark.parametrize("name,rule", [("jacquant", "ste"), ("ste", "ste"), ("stableqat", "stableqat")])
def test_recipe_places_b_on_the_update(name, rule):
    model, batches = _setup()
    q, curve = _run(qat_recipes.RECIPES[name], model, batches)
    assert len(curve) == len(batches)
    quantizers = [s.quantizer for s in jacquant.sites(q)]
    assert {qz.rule for qz in quantizers} == {rule}  # B on the update: the op's backward is plain STE
    b = torch.cat([qz.jac.flatten() for qz in quantizers])
    if qat_recipes.RECIPES[name].is_jacquant:
        assert not torch.all(b == 1)  # refreshed at step 0
        assert bool(((b >= 0.1) & (b <= 2.0)).all())
    else:
        assert torch.all(b == 1)


def test_same_recipe_and_seed_give_identical_runs():
    model, batches = _setup()
    _, a = _run(qat_recipes.RECIPES["jacquant"], model, batches)
    _, b = _run(qat_recipes.RECIPES["jacquant"], model, batches)
    assert a == b


def test_update_placement_differs_from_ste_only_through_b():
    """With B forced to 1 (λ = 0 keeps B = 1), JacQuant on the update is STE bit for bit."""
    model, batches = _setup()
    _, ste = _run(qat_recipes.RECIPES["ste"], model, batches)
    recipe = qat_recipes.RECIPES["jacquant"]
    q = qat.quantize_copy(model, recipe, jacquant.QuantConfig(bits=2, group=32))
    jacquant.qat.refresh.attach(q, jacquant.RefreshConfig(lam=0.0))
    opt = qat.make_optimizer(q, recipe, 3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, qat.cosine(len(batches)))
    curve = []
    for b in batches:
        loss = lm_loss(q(b), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        jacquant.step(q)
        curve.append(loss.item())
    assert curve == ste


def test_rtn_is_the_initial_grid_and_unknown_methods_are_errors():
    model, _ = _setup()
    q = qat.quantize_copy(model, qat_recipes.RECIPES["rtn"], jacquant.QuantConfig(bits=2, group=32))
    s = next(jacquant.sites(q))
    scale, zp = jacquant.primitives.grid.init_scale(s.quantizer.as_nk(s.weight.detach()), 2, 32, "mse")
    assert torch.equal(s.quantizer.scale.detach(), scale.half().float()) and torch.equal(s.quantizer.zero_point, zp)
    with pytest.raises(ValueError, match="unknown method"):
        qat_recipes.recipes(["ste", "nope"])


def test_a_non_finite_gradient_stops_the_run_naming_the_tensor():
    model, batches = _setup()
    q = qat.quantize_copy(model, qat_recipes.RECIPES["ste"], jacquant.QuantConfig(bits=2, group=32))
    before = {k: v.clone() for k, v in q.state_dict().items()}

    def loss_fn(m, b):
        loss = lm_loss(m(b), b)
        return loss * float("nan") if b is batches[2] else loss

    with pytest.raises(jacquant.NonFiniteError, match="non-finite"):
        qat.train(q, qat_recipes.RECIPES["ste"], iter(batches), loss_fn, len(batches), 3e-3)
    assert any(not torch.equal(before[k], v) for k, v in q.state_dict().items())  # steps 0 and 1 were taken
    assert all(torch.isfinite(v).all() for v in q.state_dict().values() if v.is_floating_point())  # not step 2
