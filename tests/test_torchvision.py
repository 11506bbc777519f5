"""torchvision models with random weights: eval unchanged, every added parameter trained by the data loss."""
from __future__ import annotations

import pytest
import torch

import cd_convert

models = pytest.importorskip("torchvision.models")

CASES = [
    ("alexnet", {}, (1, 3, 64, 64), None),
    ("vgg11", {}, (1, 3, 32, 32), None),
    ("mobilenet_v2", {}, (2, 3, 32, 32), None),
    ("squeezenet1_0", {}, (1, 3, 64, 64), None),
    ("resnet18", {}, (2, 3, 32, 32), [torch.nn.Linear]),
    ("vit_b_16", {"image_size": 32, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64, "patch_size": 16,
                  "dropout": 0.1, "attention_dropout": 0.1}, (1, 3, 32, 32), None),
]


@pytest.mark.parametrize("name,kwargs,shape,targets", CASES, ids=[c[0] for c in CASES])
def test_torchvision_model(name, kwargs, shape, targets):
    torch.manual_seed(0)
    if name == "vit_b_16":
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**kwargs, num_classes=10)
        # torchvision zero-initialises the head, which would zero every gradient behind it.
        torch.nn.init.normal_(model.heads.head.weight)
    else:
        model = getattr(models, name)(weights=None, num_classes=10, **kwargs)
    model.eval()
    x = torch.randn(*shape)
    converted = cd_convert.convert(model, targets, dataset_size=1000, example_inputs=(x,))
    assert type(converted) is type(model)
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))
    converted.train()
    converted(x).pow(2).mean().backward()
    added = {n: p for n, p in converted.named_parameters() if n.endswith("p_logit")}
    assert added, f"{name}: nothing converted\n{cd_convert.report(converted)}"
    for pname, param in added.items():
        assert param.grad is not None and param.grad != 0, f"{name}: {pname} has no gradient"
    assert torch.isfinite(cd_convert.regularization(converted))
