"""cd_convert on one small timm model per architecture family (CPU, pretrained=False, small inputs)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import cd_convert as cd  # noqa: E402
import cd_convert.timm as cdt  # noqa: E402

# name -> (timm kwargs, input size, site kinds that must appear)
FAMILIES = {
    "resnet18": (dict(drop_rate=0.2), 32, {"functional"}),
    "mobilenetv3_small_050": (dict(drop_rate=0.2), 32, {"functional"}),
    "deit_tiny_patch16_224": (dict(img_size=32, drop_rate=0.1), 32, {"fused"}),
    "convnext_atto": (dict(drop_rate=0.2), 32, set()),
}


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _pair(name, targets=None, **kwargs):
    """(original, converted) with identical weights: create once, convert a deep copy."""
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False, **kwargs).eval()
    converted = cd.convert(copy.deepcopy(original), targets, dataset_size=100)
    return original, converted


def _added(model):
    return [(n, p) for n, p in model.named_parameters() if n.endswith("p_logit")]


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _outputs(o)]


def _check_equal_and_grads(original, converted, x):
    original.eval()
    converted.eval()
    with torch.no_grad():
        ref, out = _outputs(original(x)), _outputs(converted(x))
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        assert torch.equal(a, b), f"eval output differs: {(a - b).abs().max().item()}"
    added = _added(converted)
    assert added, "no p_logit parameters were added"
    converted.train()
    outs = _outputs(converted(x))
    if outs[0].dim() == 2:
        data_loss = F.cross_entropy(outs[0], torch.zeros(x.shape[0], dtype=torch.long))
    else:
        data_loss = sum(o.pow(2).mean() for o in outs)
    reg = cd.regularization(converted)
    assert torch.isfinite(data_loss) and torch.isfinite(reg)
    converted.zero_grad(set_to_none=True)
    data_loss.backward()  # data loss ALONE: every rate must receive a gradient through the masks
    no_grad = [n for n, p in added if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not no_grad, f"p_logit without gradient from the data loss: {no_grad}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_converts(name):
    kwargs, size, kinds = FAMILIES[name]
    original, converted = _pair(name, **kwargs)
    assert type(converted) is type(original)
    rep = cd.report(converted)
    assert rep.sites
    assert kinds <= {r.kind for r in rep.sites}, str(rep)
    _check_equal_and_grads(original, converted, torch.randn(2, 3, size, size))


@pytest.mark.parametrize("name", ["resnet18", "deit_tiny_patch16_224"])
def test_timm_api_survives(name):
    kwargs, size, _ = FAMILIES[name]
    original, converted = _pair(name, **kwargs)
    x = torch.randn(2, 3, size, size)
    assert converted.pretrained_cfg == original.pretrained_cfg
    converted.eval()
    original.eval()
    with torch.no_grad():
        feats = converted.forward_features(x)
        assert torch.equal(feats, original.forward_features(x))
        assert torch.equal(converted.forward_head(feats), original.forward_head(feats))
        assert converted.forward_head(feats, pre_logits=True).shape == original.forward_head(feats, pre_logits=True).shape
    converted.set_grad_checkpointing(True)
    converted.train()
    converted(x).sum().backward()
    converted.set_grad_checkpointing(False)
    converted.reset_classifier(5)
    converted.eval()
    with torch.no_grad():
        assert converted(x).shape == (2, 5)
    assert cd.report(converted).sites


def test_create_model_one_call():
    model = cdt.create_model("resnet18", pretrained=False, drop_rate=0.2, num_classes=3, dataset_size=100)
    assert isinstance(model, timm.models.ResNet)
    rep = cd.report(model)
    assert [r.kind for r in rep.sites] == ["functional"]
    rates = cd.dropout_rates(model)
    assert len(rates) == 1 and abs(next(iter(rates.values())) - 0.2) < 1e-4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_features_only():
    # features_only models have no dropout: target the convolutions' inputs instead. zero_init_last=False:
    # timm zero-initialises each block's last BN weight, which makes the block convs' gradients exactly 0.
    original, converted = _pair("resnet18", targets=[nn.Conv2d], features_only=True, zero_init_last=False)
    assert type(converted) is type(original)
    assert len(cd.report(converted).sites) == sum(isinstance(m, nn.Conv2d) for m in original.modules())
    _check_equal_and_grads(original, converted, torch.randn(2, 3, 32, 32))


def test_vit_include_zero_rate_false_converts_fewer():
    kwargs = FAMILIES["deit_tiny_patch16_224"][0]
    all_sites = cdt.create_model("deit_tiny_patch16_224", pretrained=False, dataset_size=100, **kwargs)
    nonzero = cdt.create_model("deit_tiny_patch16_224", pretrained=False, dataset_size=100,
                               include_zero_rate=False, **kwargs)
    n_all, n_nonzero = len(cd.report(all_sites).sites), len(cd.report(nonzero).sites)
    assert 0 < n_nonzero < n_all
    assert [r.name for r in cd.report(nonzero).sites] == ["head_drop"]  # only the drop_rate=0.1 head


def test_vit_fused_attention_false_leaves_attention_fused():
    kwargs = FAMILIES["deit_tiny_patch16_224"][0]
    fused = cdt.create_model("deit_tiny_patch16_224", pretrained=False, dataset_size=100, **kwargs)
    left = cdt.create_model("deit_tiny_patch16_224", pretrained=False, dataset_size=100,
                            fused_attention=False, **kwargs)
    rep = cd.report(left)
    left_rows = [r for r in rep.rows if r.status == "left fused"]
    assert len(left_rows) == len(left.blocks)
    assert all(r.name.endswith("attn.attn_drop") for r in left_rows)
    assert not any(r.kind == "fused" for r in rep.sites)
    assert len(rep.sites) + len(left_rows) == len(cd.report(fused).sites)
    left.train()
    left(torch.randn(2, 3, 32, 32)).sum().backward()


def test_state_dict_of_unconverted_model_loads():
    kwargs = FAMILIES["deit_tiny_patch16_224"][0]
    original, converted = _pair("deit_tiny_patch16_224", **kwargs)
    result = converted.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {n for n, _ in _added(converted)}
    assert all(k.endswith("p_logit") for k in result.missing_keys)


def test_a_converted_vit_compiles_to_one_graph_in_training():
    # The attention hooks keep per-thread state; under torch.compile their thread key must not be a graph break
    # (Dynamo cannot trace threading.get_ident: each attention module used to split the graph twice).
    _, converted = _pair("vit_tiny_patch16_224", img_size=32, depth=2, drop_rate=0.1, attn_drop_rate=0.1)
    explained = torch._dynamo.explain(converted.train())(torch.randn(2, 3, 32, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
