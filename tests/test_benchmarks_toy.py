"""The toy experiment's headline behaviour on a narrow network: learned hidden p falls as N grows.

Settings checked on seeds 0-3 (hidden p about 0.32 at N=10 after 1500 steps and 0.085 at N=10000 after
500 steps; input p 0.08-0.09 in every case), so the thresholds below leave a wide margin.
"""
import numpy as np
import pytest
import torch

from benchmarks.toy import run_one


@pytest.mark.parametrize("seed", [0])
def test_hidden_rate_falls_with_data(seed):
    torch.set_num_threads(1)
    small = run_one(10, 1500, 64, seed, samples=20, n_test=200)
    large = run_one(10000, 1, 64, seed, samples=20, n_test=200, max_steps=500)
    assert len(small["rates"]) == 5  # input, hidden1, hidden2 and one site per head
    hidden_small = np.mean(small["rates"][1:])
    hidden_large = np.mean(large["rates"][1:])
    assert hidden_small > 0.25
    assert hidden_large < 0.15
    assert hidden_small - hidden_large > 0.12
    assert small["rates"][0] < 0.15 and large["rates"][0] < 0.15  # input p stays small
    assert np.isfinite([small["rmse"], large["rmse"], small["epistemic_std"], large["aleatoric_std"]]).all()
