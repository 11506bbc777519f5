"""UCI regression benchmark: the MC-dropout grid search against Concrete Dropout.

Three methods per train/test split (Gal & Ghahramani 2016 protocol, rerun in Gal, Hron, Kendall 2017):

``grid`` (the published baseline, reproduced as in yaringal/DropoutUncertaintyExps ``net.py``)
    One hidden ReLU layer of ``n_hidden`` units, ``nn.Dropout(p)`` on the input and on the hidden layer,
    Adam (lr 1e-3), batch 128, inputs and targets standardised on the fitting set. The grid is
    ``dropout_rates.txt`` x ``tau_values.txt``; each point is trained on the first 80% of the training
    split (:func:`benchmarks.datasets.validation_split`) and scored by MC test log-likelihood on the last
    20%; the best (p, tau) is refitted on the whole training split. 12 + 1 = 13 training runs per split.

    Weight decay, our reading of the original code: Keras ``W_regularizer=l2(reg)`` on every Dense kernel
    (not the biases) with ``reg = l^2 (1 - p) / (2 N tau)``, ``l = 1e-2``, ``N`` the number of examples the
    run is fitted on and ``tau`` the *raw* grid value (original units, exactly as published, although the
    net is trained on standardised targets). Keras' ``l2(reg)`` adds ``reg * sum(W**2)`` (no factor 1/2) to
    the per-batch *mean* squared error; so the loss here is
    ``mean_i (y_i - f(x_i))^2 + reg * (||W1||^2 + ||W2||^2)``. See :func:`grid_weight_decay`.

    Test metrics as in the original: T stochastic passes, means un-standardised,
    ``ll = logsumexp_t(-0.5 tau (y - mu_t)^2) - log T - 0.5 log 2pi + 0.5 log tau`` (original units) averaged
    over test points, and the RMSE of the MC mean.

``concrete_tau`` (Concrete Dropout, variant (a): learned p, tau still tuned)
    The same network without dropout, converted with ``cd_convert.convert(targets=[nn.Linear])`` (two sites:
    input and hidden). Loss: mean squared error on standardised targets, regulariser preset ``loss="mse"``
    with the precision converted to the units of the loss, ``tau * std(y_fit)^2`` (the units trap of the
    reference doc; the preset assumes ``loss = MSE = 2/tau * NLL + c``). tau is chosen on the same validation
    split by MC test LL (3 runs) and refitted on the whole training split: 4 training runs per split.

``concrete`` (variant (b): tuning-free, one training run per split)
    Learned p *and* a learned homoscedastic noise level (a scalar log-variance parameter), loss
    :func:`cd_convert.losses.heteroscedastic_gaussian` with preset ``loss="heteroscedastic"``.

    The trap: trained for the full 4000 epochs on small data sets the network keeps fitting the training
    targets, the learned noise variance follows the training residuals down, and the test LL collapses on
    some splits (overconfident; -4.94 was seen on one). The regulariser does not stop this: the noise
    parameter carries no prior. Our fix, chosen so that the method stays one training run:

    * **validation-based stop inside the run**: the run fits on the first 80% of the training split
      (the same ``validation_split`` the grid uses) and every ``--eval-every`` epochs scores the MC test LL
      on the last 20% (``--val-samples`` passes, a fixed generator). The state with the best validation LL
      is kept and used for testing; nothing is refitted. This is the textbook guard against exactly the
      failure seen (over-fitting of the noise level shows up directly as a falling held-out LL), it costs a
      few cheap forward passes and no extra training, and it uses held-out data the grid uses as well.
      The price: the final model sees 80% of the training split, not 100% as the grid's refit does.
      The run ends ``--patience`` epochs after its best check (default a quarter of the budget;
      :func:`should_stop`): the kept state cannot change after that point unless the validation LL recovers
      past its peak, and on the data sets whose best epoch is early most of the budget is saved.
    * by default (``--no-calibrate-noise`` turns it off) the noise level alone is re-picked after training
      by validation MC test LL (a 1-d search over the log-variance with the trained network's MC samples;
      no retraining).
      On yacht the learned noise came out too large (tau about 0.4 against the grid's 0.75), because the
      training residuals include those of the occasional dropped input feature, which the MC mixture then
      counts a second time; this corrects it for the price of a few forward passes.
    * optionally (``--noise-prior W``) a weak Gaussian prior on the log-variance towards log(1) = 0 (the
      variance of the standardised targets), ``W * s^2 / N`` added to the loss. Off by default.

``concrete_refit`` (opt-in; variant (b) with the grid's refit: two training runs per split)
    ``concrete``'s run, then the same recipe trained again on the whole training split for the first run's
    best epoch (the held-out 20% is used, as the grid uses it, to choose a setting, here the epoch count).
    Nothing is left to check or calibrate the refit on, so it is tested with the first run's calibrated noise
    level (:func:`refit_concrete`).

``concrete_freeze`` (opt-in; variant (b) with the rates fixed at the first declining check)
    ``concrete``'s run, except at the first validation check that does not beat the best one: there the best
    check's state is loaded back, the p-logits stop training (no gradient), and the weights and the noise level
    train on from that state under the same checkpoint rule; the patience counts from that check or a later
    best one (:func:`train_keep_best`'s ``on_first_decline``). Why: the training objective keeps lowering the
    rates as the network fits its 80% (``benchmarks.uci_terms`` shows it for the paper's setting), and the
    validation LL falls with them; a network whose rate is held fixed, as each grid point's is, can go on
    improving. One training run.

``concrete_freeze_refit`` (opt-in; ``concrete_freeze`` with the grid's refit: two training runs per split)
    ``concrete_freeze``'s run, then a refit on the whole training split as ``concrete_refit``'s, for the first
    run's best epoch and tested with its calibrated noise level, with one difference: the refit's sites hold the
    first run's rates for the whole run (``fixed_rates`` of :func:`refit_concrete`), as the grid's refit holds
    the chosen p. Learning the rates again would let them fall for as long as the refit trains.

``concrete_freeze_warm`` (opt-in; ``concrete_freeze`` with a warm refit: one training run per split)
    ``concrete_freeze``'s run and calibration, then the kept state trains on over the whole training split (the
    held-out 20% joined in, standardised with the fitting set's statistics) for a quarter of its best epoch
    (``WARM_FRACTION``), with the rates and the calibrated noise level held; it is tested as it ends
    (:func:`_continue_on_whole_split`). The grid's last step is a refit on the whole training split, which the
    one-run methods lack (``grid_calibrated``, the grid without it, is as far behind the published grid on
    wine as ``concrete``); a refit from scratch costs a second run, and this one starts from the chosen state,
    so a fraction of the epochs lets the joined rows in. A quarter: the joined rows are a quarter of the
    fitting set's.

``concrete_freeze_warm_decay`` (opt-in; ``concrete_freeze_warm`` with a decaying learning rate)
    The same run, calibration and warm-epoch count, the warm epochs' learning rate falling linearly to zero
    (``decay_to_zero`` of :func:`benchmarks.uci.training._train`). At the protocol's constant rate the test
    log-likelihood of naval's near-noise-free fit swings by nats from one epoch to the next, so the constant-rate
    warm epochs end at a random point of that swing; a rate that ends near zero ends near a minimum.

``concrete_heldout`` (opt-in; variant (b) with the rates and the noise level learned on the held-out 20%)
    ``concrete``'s run (same network, fitting set, checks, checkpoint rule, early stop and calibration), with
    the parameters split between the two sets (:func:`run_concrete`'s ``heldout_samples``;
    :func:`_train_heldout`): each epoch the weights take their steps on the fitting set (heteroscedastic loss
    plus the regulariser), then the p-logits and the log-variance take theirs on the held-out set, minimising
    minus the MC predictive log-density of ``HELDOUT_SAMPLES`` relaxed passes
    (:func:`cd_convert.losses.gaussian_mixture_nll`). The training objective drives the rates down as the
    network fits its data (``benchmarks.uci_terms``); the held-out mixture is the quantity the grid selects its
    rate by, and it is differentiable in the rates because the masks are relaxed. One training run; a rate step
    costs ``HELDOUT_SAMPLES`` passes over its batch.

``concrete_tau_stop`` (opt-in; variant (a) with the epoch count chosen on validation)
    ``concrete_tau``'s objective and tau grid, with each tau's validation run under the checkpoint rule
    (:func:`run_concrete_tau_keep_best`); the tau whose best check is highest wins and the refit on the whole
    training split trains for that check's epoch. ``python -m benchmarks.uci_terms`` shows why this matters:
    the learned rates keep falling as the network fits the training data, and the validation LL peaks long
    before the 4000th epoch.

``grid_calibrated`` (opt-in: ``--methods grid,grid_calibrated,concrete``; the grid given concrete's extras)
    The grid above with the two advantages ``concrete`` has, so that the three compare like with like:

    * **the same checkpoint rule**: each of the 12 grid points is trained on the first 80% of the training
      split exactly as the grid's validation runs (same seeds, so the same training trajectory: the checks
      draw their dropout masks from a forked RNG) and every ``--eval-every`` epochs (and at the last) scored
      by MC test LL with the point's tau on the last 20% (``--val-samples`` passes); each point keeps its
      best-validation state (:func:`train_keep_best`). The (p, tau) with the best kept validation LL wins,
      and its kept state is tested; nothing is refitted (as in ``concrete``; the grid's refit is dropped).
    * **the same noise calibration** (``--calibrate-noise``, default; ``--no-calibrate-noise`` turns it off
      here too): the network has no noise parameter, so its tau is re-picked by validation MC LL with
      :func:`best_noise_log_variance` over the same candidates as ``concrete`` (``CALIBRATION_OFFSETS``
      around the chosen tau's log-variance, ``log(1 / (tau std(y_fit)^2))`` in standardised units), from
      ``--val-samples`` fresh MC passes. The test LL uses the calibrated tau. 12 training runs per split.

Cost: besides wall-clock and training runs, every record counts forward passes: ``train_batches`` (training
mini-batches, ``ceil(N_fit / 128)`` per epoch per run), ``mc_passes`` (one per MC sample of every
validation, checkpoint, calibration and test evaluation) and their sum ``forward_passes``. An MC pass is over
a whole evaluation set, a training batch over at most 128 rows: the two parts are reported separately.

Published per-split results: with ``<data dir>/uci-published/<name>/`` present
(:func:`benchmarks.datasets.load_published`), each method's summary gets ``vs_published``: the mean over the
splits run of (method - published grid) in test LL and RMSE on the *same* split indices, its standard error
(paired differences), and the published mean over those same splits (:func:`compare_with_published`).

Usage::

    python -m benchmarks.uci                                  # embedded sklearn diabetes, quick settings
    python -m benchmarks.uci --data-dir ../shared/datasets --datasets yacht --splits 20 --epochs 4000 \\
        --samples 10000 --json results/uci_full_yacht.json --plot results/uci_full_yacht.png

The package, one job per module:

- :mod:`.protocol`: the networks, metrics, published table and standardised folds of the protocol;
- :mod:`.decisions`: the choices as pure functions (selection, calibration, checks, the checkpoint rule);
- :mod:`.training`: the training loop and the count of forward passes (:data:`.training.PASSES`);
- :mod:`.grid`: ``grid`` and ``grid_calibrated``;
- :mod:`.concrete_net`: the converted network, its losses, rates and MC evaluation;
- :mod:`.concrete_tau`: ``concrete_tau`` and ``concrete_tau_stop``;
- :mod:`.concrete`: ``concrete``, its one-run variants and the refit of the two-run ones;
- :mod:`.heldout`: ``concrete_heldout``'s training;
- :mod:`.driver`: every method asked for on every split, with costs and the published comparison;
- :mod:`.table` and :mod:`.cli`: the printed table, the figure and the command line.
"""

from __future__ import annotations

from .cli import epochs_for, main
from .concrete import REFITS, WARM_FRACTION, refit_concrete, run_concrete
from .concrete_net import calibrate_noise
from .concrete_tau import run_concrete_tau, run_concrete_tau_keep_best
from .decisions import (
    CALIBRATION_OFFSETS,
    BestState,
    best_noise_log_variance,
    is_eval_epoch,
    select_best,
    should_stop,
    train_keep_best,
)
from .driver import ALL_METHODS, METHODS, compare_with_published, run_dataset, runs_per_split
from .grid import calibrate_grid_tau, run_grid_calibrated, run_grid_point, run_grid_point_keep_best
from .protocol import (
    LENGTH_SCALE,
    PUBLISHED,
    Fold,
    GridNet,
    NoiseNet,
    PlainNet,
    grid_weight_decay,
    mc_rmse,
    mc_test_ll_tau,
)
from .table import format_table, plot
from .training import BATCH_SIZE, PASSES, protocol_optimizer, train_epoch

__all__ = [
    "ALL_METHODS",
    "BATCH_SIZE",
    "CALIBRATION_OFFSETS",
    "LENGTH_SCALE",
    "METHODS",
    "PASSES",
    "PUBLISHED",
    "REFITS",
    "WARM_FRACTION",
    "BestState",
    "Fold",
    "GridNet",
    "NoiseNet",
    "PlainNet",
    "best_noise_log_variance",
    "calibrate_grid_tau",
    "calibrate_noise",
    "compare_with_published",
    "epochs_for",
    "format_table",
    "grid_weight_decay",
    "is_eval_epoch",
    "main",
    "mc_rmse",
    "mc_test_ll_tau",
    "plot",
    "protocol_optimizer",
    "refit_concrete",
    "run_concrete",
    "run_concrete_tau",
    "run_concrete_tau_keep_best",
    "run_dataset",
    "run_grid_calibrated",
    "run_grid_point",
    "run_grid_point_keep_best",
    "runs_per_split",
    "select_best",
    "should_stop",
    "train_epoch",
    "train_keep_best",
]
