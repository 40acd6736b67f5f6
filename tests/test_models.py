import pytest
import torch

from fedbabu.models import build_model, count_parameters


@pytest.mark.parametrize("name", ["digitcnn", "4convnet", "mobilenet", "resnet18", "resnet50"])
def test_every_model_is_body_then_linear_head(name):
    channels, size = (1, 8) if name == "digitcnn" else (3, 32)
    model = build_model(name, channels, size, 10)
    assert [n for n, _ in model.named_children()] == ["body", "head"]
    assert isinstance(model.head, torch.nn.Linear)
    assert all(k.startswith(("body.", "head.")) for k in model.state_dict())
    assert not list(model.buffers()), "batch norm must not keep running statistics"
    out = model(torch.randn(4, channels, size, size))
    assert out.shape == (4, 10)


def test_4convnet_parameter_counts_match_the_paper():
    model = build_model("4convnet", 3, 32, 100)
    assert count_parameters(model, "body") == 113_088
    assert count_parameters(model, "head") == 25_700
    assert count_parameters(model) == 138_788


@pytest.mark.parametrize("name", ["4convnet", "mobilenet", "resnet18"])
def test_models_adapt_to_fashion_mnist(name):
    model = build_model(name, 1, 28, 10)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_same_seed_same_weights_and_head_inits():
    a, b = build_model("4convnet", 3, 32, 10, seed=3), build_model("4convnet", 3, 32, 10, seed=3)
    c = build_model("4convnet", 3, 32, 10, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.head.weight, c.head.weight)
    ortho = build_model("4convnet", 3, 32, 10, head_init="orthogonal").head.weight
    assert torch.allclose(ortho @ ortho.T, torch.eye(10), atol=1e-5)
    zeros = build_model("4convnet", 3, 32, 10, head_init="zeros").head
    assert not zeros.weight.any() and not zeros.bias.any()
