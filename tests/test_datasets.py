"""Tests of benchmarks/datasets.py. Tests that need ../shared/datasets skip when it is absent."""
from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import struct
import sys
import warnings

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a plain folder at the repo root, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import datasets as ds  # noqa: E402

# (rows, inputs) and (splits, hidden units, n_epochs.txt) as the shared data's README describes the files.
UCI_SHAPES = {
    "bostonHousing": (506, 13), "energy": (768, 8), "wine-quality-red": (1599, 11), "yacht": (308, 6),
    "naval-propulsion-plant": (11934, 16), "power-plant": (9568, 4), "protein-tertiary-structure": (45730, 9),
}
UCI_SETTINGS = {"protein-tertiary-structure": (5, 100, 20)}


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The shared data folder: $CD_CONVERT_DATA, else <repo>/../shared/datasets; skip when absent."""
    root = pathlib.Path(os.environ.get(ds.ENV_VAR) or REPO.parent / "shared" / "datasets")
    if not (root / "uci").is_dir() or not (root / "mnist").is_dir():
        pytest.skip(f"shared data sets not found at {root} (set {ds.ENV_VAR} to the datasets folder)")
    return root


def idx_bytes(array: np.ndarray, code: int = 0x08, dtype: str = ">u1") -> bytes:
    """An IDX file built by hand: magic (0, 0, type code, ndim), big-endian uint32 dims, then the data."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(dtype).tobytes()


def write_mnist(folder: pathlib.Path, prefix: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


# ------------------------------------------------------------------------------------------ common


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    assert ds.data_root() is None
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path))
    assert ds.data_root() == tmp_path
    assert ds.data_root("/elsewhere") == pathlib.Path("/elsewhere")


# --------------------------------------------------------------------------------------------- UCI


@pytest.mark.parametrize("name", UCI_SHAPES)
def test_uci_shapes_and_settings(shared_data, name):
    data = ds.load_uci(name, shared_data)
    assert data.X.shape == UCI_SHAPES[name] and data.X.dtype == np.float64
    assert data.y.shape == (UCI_SHAPES[name][0],) and data.y.dtype == np.float64
    assert (data.n_splits, data.n_hidden, data.n_epochs) == UCI_SETTINGS.get(name, (20, 50, 40))
    assert data.dropout_rates == [0.005, 0.01, 0.05, 0.1]
    assert len(data.tau_values) == 3 and all(t > 0 for t in data.tau_values)


@pytest.mark.parametrize("name", UCI_SHAPES)
def test_uci_splits_disjoint_and_cover(shared_data, name):
    data = ds.load_uci(name, shared_data)
    n = len(data.y)
    for k in range(data.n_splits):
        train, test = data.split(k)
        assert train.dtype == np.int64 and np.intersect1d(train, test).size == 0
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(n))
        assert abs(len(test) / n - 0.1) < 0.01
    with pytest.raises(IndexError):
        data.split(data.n_splits)


def test_uci_datasets_in_lists_complete_folders_benchmark_order_first(tmp_path, monkeypatch):
    for name in ("yacht", "zzz-own", "bostonHousing", "incomplete"):
        folder = tmp_path / "uci" / name
        folder.mkdir(parents=True)
        for f in ds._UCI_META_FILES[: 2 if name == "incomplete" else None]:
            (folder / f).write_text("0\n")
    (tmp_path / "uci" / "a-file.txt").write_text("")
    assert ds.uci_datasets_in(tmp_path) == ["bostonHousing", "yacht", "zzz-own"]
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path))
    assert ds.uci_datasets_in() == ["bostonHousing", "yacht", "zzz-own"]
    assert ds.uci_datasets_in(tmp_path / "nothing-here") == []


def test_uci_accepts_dataset_folder_directly(shared_data):
    direct = ds.load_uci("yacht", shared_data / "uci")
    via_root = ds.load_uci("yacht", shared_data)
    assert np.array_equal(direct.X, via_root.X)
    assert np.array_equal(direct.split(3)[0], via_root.split(3)[0])


def test_uci_reads_data_dir_from_env(shared_data, monkeypatch):
    monkeypatch.setenv(ds.ENV_VAR, str(shared_data))
    assert ds.load_uci("yacht").X.shape == UCI_SHAPES["yacht"]


def test_validation_split_takes_last_20_percent(shared_data):
    train, _ = ds.load_uci("bostonHousing", shared_data).split(0)
    fit, val = ds.validation_split(train)
    n_fit = int(0.8 * len(train))
    assert np.array_equal(fit, train[:n_fit]) and np.array_equal(val, train[n_fit:])


def test_validation_split_synthetic():
    idx = np.array([9, 3, 7, 1, 0, 5, 2, 8, 6, 4])
    fit, val = ds.validation_split(idx)
    assert fit.tolist() == [9, 3, 7, 1, 0, 5, 2, 8] and val.tolist() == [6, 4]
    with pytest.raises(ValueError):
        ds.validation_split(idx, fraction=1.0)


def test_standardize_uses_fitting_stats_only():
    rng = np.random.default_rng(0)
    fit = rng.normal(3.0, 2.0, size=(50, 3))
    fit[:, 2] = 7.0  # constant column: std 0 -> 1
    test = rng.normal(-10.0, 5.0, size=(20, 3))
    mean, std, (fit_s, test_s) = ds.standardize(fit, test)
    assert np.allclose(mean, fit.mean(0))
    assert np.allclose(std[:2], fit[:, :2].std(0)) and std[2] == 1.0
    assert np.allclose(fit_s[:, :2].mean(0), 0) and np.allclose(fit_s[:, :2].std(0), 1)
    assert np.allclose(test_s, (test - fit.mean(0)) / std)
    y_mean, y_std, (y_s,) = ds.standardize(fit[:, 0])
    assert np.ndim(y_mean) == 0 and np.isclose(y_s.std(), 1)


def test_uci_missing_folder_message(monkeypatch, tmp_path):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        ds.load_uci("yacht", tmp_path, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert ds.ENV_VAR in message and "download=True" in message and str(tmp_path / "uci" / "yacht") in message


def test_in_memory_splits_are_validated():
    X, y = np.zeros((10, 2)), np.zeros(10)
    bad = [(np.arange(6), np.arange(5, 10))]
    with pytest.raises(ValueError, match="overlap"):
        ds.UCIDataset("toy", X, y, 1, 50, 40, [0.1], [1.0], splits=bad)


# ------------------------------------------------------------------------------------------- MNIST


def test_read_idx_handwritten(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "raw.idx").write_bytes(idx_bytes(images))
    (tmp_path / "zipped.gz").write_bytes(gzip.compress(idx_bytes(images)))
    for name in ("raw.idx", "zipped.gz"):
        out = ds.read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and np.array_equal(out, images)
    shorts = np.array([-2, 300, 7], dtype=np.int16)
    (tmp_path / "short.idx").write_bytes(idx_bytes(shorts, code=0x0B, dtype=">i2"))
    assert ds.read_idx(tmp_path / "short.idx").tolist() == [-2, 300, 7]


def test_read_idx_rejects_bad_files(tmp_path):
    good = idx_bytes(np.zeros((2, 2), dtype=np.uint8))
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02" + good[2:])
    (tmp_path / "code.idx").write_bytes(b"\x00\x00\x42" + good[3:])
    (tmp_path / "short.idx").write_bytes(good[:-1])
    for name, match in (("magic.idx", "magic"), ("code.idx", "magic"), ("short.idx", "header says")):
        with pytest.raises(ValueError, match=match):
            ds.read_idx(tmp_path / name)


def test_mnist_shared_split(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # md5 check passes: no warning
        a = ds.load_mnist(shared_data, split_seed=0)
    assert a["x_train"].shape == (8000, 1, 28, 28) and a["x_test"].shape == (2000, 1, 28, 28)
    assert a["x_train"].dtype == np.float32 and a["y_train"].dtype == np.int64
    for key in ("x_train", "x_test"):
        assert a[key].min() >= 0.0 and a[key].max() <= 1.0 and a[key].max() > 0.99
    for key in ("y_train", "y_test"):
        assert set(np.unique(a[key]).tolist()) == set(range(10))
    b = ds.load_mnist(shared_data / "mnist", split_seed=0)
    c = ds.load_mnist(shared_data, split_seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["y_train"], c["y_train"])
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert hashlib.md5((shared_data / "mnist" / f).read_bytes()).hexdigest() == ds.MNIST_MD5[f]


def test_mnist_t10k_only_split_and_md5_warning(tmp_path):
    write_mnist(tmp_path / "mnist", "t10k", 10, seed=0)
    with pytest.warns(UserWarning, match="md5"):
        out = ds.load_mnist(tmp_path, n_train=6, cache_dir=tmp_path / "cache")
    assert out["x_train"].shape == (6, 1, 28, 28) and out["y_test"].shape == (4,)
    assert sorted(np.concatenate([out["y_train"], out["y_test"]]).tolist()) == list(range(10))


def test_mnist_full_training_files(tmp_path):
    write_mnist(tmp_path, "train", 12, seed=1)
    write_mnist(tmp_path, "t10k", 5, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hand-made files fail the md5 check by design
        full = ds.load_mnist(tmp_path, n_train=None, cache_dir=tmp_path / "cache")
        sub = ds.load_mnist(tmp_path, n_train=7, cache_dir=tmp_path / "cache")
    assert full["x_train"].shape == (12, 1, 28, 28) and full["x_test"].shape == (5, 1, 28, 28)
    assert sub["x_train"].shape == (7, 1, 28, 28) and np.array_equal(sub["x_test"], full["x_test"])


def test_mnist_missing_message(monkeypatch, tmp_path):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=ds.ENV_VAR):
        ds.load_mnist(tmp_path, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------- embedded


def test_embedded_regression():
    data = ds.load_embedded_regression()
    assert data.name == "sklearn-diabetes" and data.X.shape == (442, 10) and data.y.shape == (442,)
    assert data.X.dtype == np.float64 and data.y.dtype == np.float64
    assert (data.n_splits, data.n_hidden, data.n_epochs) == (20, 50, 40)
    assert data.dropout_rates == [0.005, 0.01, 0.05, 0.1] and len(data.tau_values) == 3
    for k in range(data.n_splits):
        train, test = data.split(k)
        assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == 442
        assert len(test) == 44
    again, other = ds.load_embedded_regression(), ds.load_embedded_regression(seed=1)
    assert np.array_equal(again.split(5)[1], data.split(5)[1])
    assert not np.array_equal(other.split(5)[1], data.split(5)[1])
    assert not np.array_equal(data.split(0)[1], data.split(1)[1])


def test_embedded_digits():
    a, b, c = ds.load_embedded_digits(), ds.load_embedded_digits(), ds.load_embedded_digits(split_seed=1)
    assert a["x_train"].shape == (1438, 1, 8, 8) and a["x_test"].shape == (359, 1, 8, 8)
    assert a["x_train"].dtype == np.float32 and a["y_test"].dtype == np.int64
    assert a["x_train"].min() == 0.0 and a["x_train"].max() == 1.0
    assert set(np.unique(a["y_train"]).tolist()) == set(range(10))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["y_test"], c["y_test"])


# ------------------------------------------------------------------------ download (network mocked)


def fake_download(server: pathlib.Path, base_url: str, fetched: list):
    """A stand-in for ds._download that serves files from a local folder and records the URLs."""

    def fetch(url: str, dest: pathlib.Path) -> None:
        assert url.startswith(base_url)
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((server / url[len(base_url):]).read_bytes())

    return fetch


def test_uci_download_into_cache(shared_data, monkeypatch, tmp_path):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    base = ds.UCI_URL.format(name="yacht", file="")
    fetched: list = []
    monkeypatch.setattr(ds, "_download", fake_download(shared_data / "uci" / "yacht", base, fetched))
    data = ds.load_uci("yacht", tmp_path / "empty", download=True, cache_dir=tmp_path / "cache")
    assert len(fetched) == 8 + 2 * 20 and data.split_dir == tmp_path / "cache"
    assert np.array_equal(data.X, ds.load_uci("yacht", shared_data).X)
    ds.load_uci("yacht", tmp_path / "empty", cache_dir=tmp_path / "cache")  # cached: no download needed
    assert len(fetched) == 48


def test_mnist_download_into_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    write_mnist(tmp_path / "server", "train", 12, seed=1)
    write_mnist(tmp_path / "server", "t10k", 5, seed=2)
    fetched: list = []
    monkeypatch.setattr(ds, "_download", fake_download(tmp_path / "server", ds.MNIST_URL, fetched))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ds.load_mnist(download=True, n_train=None, cache_dir=tmp_path / "cache")
    assert sorted(fetched) == sorted(ds.MNIST_URL + f for f in ds.MNIST_MD5)
    assert out["x_train"].shape == (12, 1, 28, 28) and out["x_test"].shape == (5, 1, 28, 28)
