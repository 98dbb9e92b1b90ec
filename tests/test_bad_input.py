"""Every bad input is a clear ValueError/TypeError that names the field or the layer."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jacquant

from conftest import mlp


@pytest.mark.parametrize("bits", [1, 5, 16, 0])
def test_bits_outside_the_set(bits):
    with pytest.raises(ValueError, match=rf"bits={bits} is not supported"):
        jacquant.transform(mlp(), bits=bits, group=32)


@pytest.mark.parametrize("bits", [2.0, "2", True])
def test_bits_of_the_wrong_type(bits):
    with pytest.raises(TypeError, match="bits must be an int"):
        jacquant.transform(mlp(), bits=bits, group=32)


def test_group_that_does_not_divide_in_features_names_the_layer():
    with pytest.raises(ValueError, match=r"layer `0`: in_features 64 is not divisible by group 48; use group=-1 or a divisor such as 64"):
        jacquant.transform(mlp(), bits=2, group=48)


@pytest.mark.parametrize("group", [0, -2])
def test_group_not_positive(group):
    with pytest.raises(ValueError, match="group"):
        jacquant.transform(mlp(), bits=2, group=group)


def test_unknown_method_and_init():
    with pytest.raises(ValueError, match="method='lsq'"):
        jacquant.transform(mlp(), method="lsq")
    with pytest.raises(ValueError, match="init='percentile'"):
        jacquant.transform(mlp(), init="percentile")
    with pytest.raises(ValueError, match="amplitude"):
        jacquant.transform(mlp(), method="stableqat", amplitude=0.5)


def test_model_with_no_matmul():
    model = nn.Sequential(nn.Embedding(10, 8), nn.ReLU())
    with pytest.raises(ValueError, match="has no matmul with a weight operand"):
        jacquant.transform(model, bits=2, group=8)


def test_transforming_twice():
    m = jacquant.transform(mlp(), bits=2, group=32)
    with pytest.raises(ValueError, match="already transformed"):
        jacquant.transform(m, bits=2, group=32)


def test_nan_weights_name_the_layer():
    m = mlp()
    with torch.no_grad():
        m[2].weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"layer `2`: weight `2.weight` has 1 non-finite values"):
        jacquant.transform(m, bits=2, group=32)


def test_not_a_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        jacquant.transform(lambda x: x)


class LeftOperand(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 32))

    def forward(self, x):
        return torch.matmul(self.w, x)


def test_weight_as_left_operand_is_refused():
    with pytest.raises(TypeError, match=r"parameter `w` is the left operand"):
        jacquant.transform(LeftOperand(), bits=2, group=16)


class TrainingDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 32))

    def forward(self, x):
        return F.dropout(F.linear(x, self.w), 0.1, self.training)


def test_forward_that_depends_on_training_mode_is_refused():
    with pytest.raises(TypeError, match=r"layer `<root>` \(TrainingDependent\): its forward changes with self.training"):
        jacquant.transform(TrainingDependent(), bits=2, group=16)


def test_everything_filtered_out():
    with pytest.raises(ValueError, match="every weight matmul of Sequential was excluded"):
        jacquant.transform(mlp(), bits=2, group=32, filter=lambda name, mod: False)


class LoopOverBatch(nn.Module):
    """symbolic_trace cannot iterate over range(x.shape[0]); torch.export can (it specialises)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 8)

    def forward(self, x):
        return torch.stack([self.lin(x[i]) for i in range(x.shape[0])])


def test_untraceable_model_asks_for_example_inputs_then_works_with_them():
    with pytest.raises(TypeError, match="does not trace with torch.fx.symbolic_trace .* pass example_inputs"):
        jacquant.transform(LoopOverBatch(), bits=2, group=32)
    m = jacquant.transform(LoopOverBatch(), bits=2, group=32, example_inputs=(torch.randn(3, 32),))
    assert [s.name for s in jacquant.sites(m)] == ["lin"]
    x = torch.randn(5, 32)  # the user's own forward keeps running, with any batch size
    q = m.lin.weight_quantizer
    torch.testing.assert_close(m(x), F.linear(x, q.quantized_weight(m.lin.weight), m.lin.bias))
