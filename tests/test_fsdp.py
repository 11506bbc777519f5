"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with two gloo processes on CPU (issue 14).

What a user has to do, found here (torch 2.14):

* ``fully_shard`` refuses scalar parameters, and every site's ``p_logit`` is one: pass the p-logits as
  ``ignored_params``. FSDP then neither shards nor reduces them, so average their gradients over the ranks
  after ``backward`` (as DDP would), or the learned rates drift apart.
* Between forward passes (and after a forward, for modules sharded on their own) the consumer weights are
  sharded DTensors. ``cd_convert.regularization`` reduces each squared norm over the shards, so every rank
  gets the value of the unsharded model and the gradient of its own shard; it is a collective, called by
  every rank (as it is when added to each rank's loss).
"""

from __future__ import annotations

import copy
import inspect
import os
import sys
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import cd_convert

WORLD = 2
STEPS = 6


def _mlp() -> nn.Module:
    # The last layer has 3 rows: sharded over 2 ranks as 2 + 1 rows (an uneven shard).
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or gradient, detached."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _regularizer_and_grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The regulariser's value and its gradient w.r.t. every parameter (whole tensors), grads reset after."""
    reg = cd_convert.regularization(model)
    reg.backward()
    out = {"value": reg.detach().clone()}
    out.update({name: _full(p.grad) for name, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return out


def _eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The data loss without dropout (eval mode): the training losses carry each step's mask noise."""
    model.eval()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    model.train()
    return loss


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    # One thread: an OpenMP pool inherited through fork can hang (as in DataLoader workers).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = cd_convert.convert(_mlp(), dataset_size=256)
    with torch.no_grad():  # distinctive rates, so that a rate read from the wrong place shows
        model[2].p_logit.fill_(-1.0)
        model[5].p_logit.fill_(0.5)
    reference = copy.deepcopy(model)  # unsharded, same weights
    try:
        fully_shard(copy.deepcopy(model), mesh=DeviceMesh.from_group(dist.group.WORLD, "cpu"))
        refusal = ""
    except ValueError as err:
        refusal = str(err)
    logits = [p for name, p in model.named_parameters() if name.endswith("p_logit")]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    # One mesh over the default group (fully_shard's default builds a new process group per call: seconds each).
    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    for layer in linears:  # sharded on their own: resharded after each forward, so the loss sees DTensors
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(logits))  # scalar parameters are refused otherwise
    result: Dict[str, object] = {"refusal": refusal, "reference": _regularizer_and_grads(reference)}

    # The same model unsharded (plain tensors) and then sharded (DTensors): the collector's cached plan must
    # follow the parameters' type.
    for layer in linears:
        layer.unshard()
    result["unsharded_types"] = sorted({type(layer.weight).__name__ for layer in linears})
    result["unsharded"] = _regularizer_and_grads(model)
    for layer in linears:
        layer.reshard()
    result["weight_types"] = sorted({type(layer.weight).__name__ for layer in linears})
    result["sharded"] = _regularizer_and_grads(model)

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # different data and masks per rank
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    eval_losses = [_eval_loss(model, x, y)]
    losses: List[float] = []
    for _ in range(STEPS):
        loss = nn.functional.cross_entropy(model(x), y) + cd_convert.regularization(model)
        opt.zero_grad()
        loss.backward()
        for p in logits:  # FSDP ignores them: average their gradients over the ranks, as DDP does
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        losses.append(float(loss.detach()))
    eval_losses.append(_eval_loss(model, x, y))
    # After training: the regulariser of the sharded model against an unsharded copy of the trained weights.
    trained = {name: _full(p) for name, p in model.named_parameters()}
    reference.load_state_dict(trained, strict=False)
    result.update(
        losses=losses,
        eval_losses=eval_losses,
        rates=cd_convert.dropout_rates(model),
        trained_value=float(cd_convert.regularization(model)),
        trained_reference=float(cd_convert.regularization(reference)),
    )
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> List[dict]:
    if sys.platform == "win32" or not dist.is_available():
        pytest.skip("needs torch.distributed with gloo and a file:// rendezvous")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard)")
    if "ignored_params" not in inspect.signature(fsdp.fully_shard).parameters:
        pytest.skip("needs a fully_shard with ignored_params (torch 2.6 has none: the p-logits cannot be left out)")
    import torch._dynamo  # noqa: F401  (fully_shard imports it on first use: once here, for the forked workers)

    tmp = tmp_path_factory.mktemp("fsdp")
    # fork: the workers share this process's imports (spawn re-imports torch in each, ~30 s on a loaded CPU).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_fsdp_worker, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, start_method=method)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_p_logit_must_be_ignored_by_fully_shard(fsdp_results):
    # Why the worker passes ignored_params. If a torch accepts scalars, the recipe can be simpler.
    assert all("scalar parameters" in result["refusal"] for result in fsdp_results)


def test_regularizer_of_sharded_weights_equals_unsharded(fsdp_results):
    for result in fsdp_results:
        assert result["weight_types"] == ["DTensor"]  # the sharded calls really saw DTensors
        assert result["unsharded_types"] == ["Parameter"]  # and the unsharded ones plain tensors
        reference = result["reference"]
        assert set(reference) == {"value", "2.p_logit", "5.p_logit", "3.weight", "6.weight"}
        for state in ("unsharded", "sharded"):
            got = result[state]
            assert set(got) == set(reference), state
            for name, value in reference.items():  # value, and the gradient w.r.t. each weight and logit
                torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=f"{state} {name}")


def test_rates_identical_on_ranks_and_loss_decreases(fsdp_results):
    r0, r1 = fsdp_results
    assert r0["rates"] == r1["rates"]  # exactly: averaged gradients, same Adam steps
    assert set(r0["rates"]) == {"2", "5"}
    initial = {"2": torch.sigmoid(torch.tensor(-1.0)).item(), "5": torch.sigmoid(torch.tensor(0.5)).item()}
    assert all(abs(r0["rates"][k] - initial[k]) > 1e-3 for k in initial)  # the rates did train
    for result in fsdp_results:
        assert all(torch.isfinite(torch.tensor(result["losses"])))
        before, after = result["eval_losses"]
        assert after < before  # each rank repeats its own batch: its loss without dropout goes down
        assert result["trained_value"] == pytest.approx(result["trained_reference"], rel=1e-6, abs=1e-8)
    assert r0["trained_value"] == r1["trained_value"]
