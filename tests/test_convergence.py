"""The convergence benchmark: its dataset loaders and a short end-to-end run."""

from __future__ import annotations

import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import _data  # noqa: E402
import convergence  # noqa: E402

TRAIN_PER_BATCH = 6
NUM_TEST = 8


def _write_cifar10_batches(
    directory: Path,
    rng: np.random.Generator,
    train_per_batch: int = TRAIN_PER_BATCH,
    num_test: int = NUM_TEST,
    learnable: bool = False,
) -> dict[str, dict]:
    """Writes data_batch_1..5 and test_batch like the real archive; returns what was written.

    With ``learnable``, every image of class c is a noisy version of one colour of a
    fixed palette, so a classifier can beat chance; otherwise pixels are uniform noise.
    """
    directory.mkdir(parents=True)
    palette = rng.integers(0, 256, size=(10, 3))
    written = {}
    for index, name in enumerate([*_data.CIFAR10_TRAIN_FILES, _data.CIFAR10_TEST_FILE]):
        size = num_test if name == _data.CIFAR10_TEST_FILE else train_per_batch
        labels = rng.integers(0, 10, size=size)
        data = rng.integers(0, 256, size=(size, 3072))
        if learnable:
            colours = np.repeat(palette[labels], 1024, axis=1)  # [N, 3072] in R..G..B order
            data = np.clip(colours + rng.normal(0, 40, size=(size, 3072)), 0, 255)
        batch = {
            b"batch_label": f"batch {index}".encode(),
            b"data": data.astype(np.uint8),
            b"labels": [int(label) for label in labels],
            b"filenames": [f"{name}_{i}.png".encode() for i in range(size)],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)
        written[name] = batch
    return written


@pytest.fixture
def cifar10(tmp_path):
    """A tiny CIFAR-10 in both forms: the extracted directory and the .tar.gz archive."""
    extracted_parent = tmp_path / "extracted"
    batches_dir = extracted_parent / _data.CIFAR10_DIR
    written = _write_cifar10_batches(batches_dir, np.random.default_rng(0))
    archive = tmp_path / "archive" / _data.CIFAR10_ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches_dir, arcname=_data.CIFAR10_DIR)
    return {"written": written, "parent": extracted_parent, "dir": batches_dir, "archive": archive}


def _expected_images(batch: dict) -> np.ndarray:
    """[N, 32, 32, 3] in [0, 1], pixel by pixel from the documented row layout."""
    data = batch[b"data"]
    images = np.empty((len(data), 32, 32, 3), np.float64)
    for channel in range(3):
        for row in range(32):
            start = channel * 1024 + row * 32
            images[:, row, :, channel] = data[:, start : start + 32] / 255.0
    return images


def _check_cifar10(dataset: _data.Dataset, written: dict[str, dict]) -> None:
    train_batches = [written[name] for name in _data.CIFAR10_TRAIN_FILES]
    test_batch = written[_data.CIFAR10_TEST_FILE]
    assert dataset.x_train.shape == (5 * TRAIN_PER_BATCH, 32, 32, 3)
    assert dataset.x_test.shape == (NUM_TEST, 32, 32, 3)
    assert dataset.x_train.dtype == np.float32 and dataset.x_test.dtype == np.float32
    assert dataset.y_train.dtype == np.int32 and dataset.y_test.dtype == np.int32
    np.testing.assert_array_equal(
        dataset.y_train, np.concatenate([batch[b"labels"] for batch in train_batches])
    )
    np.testing.assert_array_equal(dataset.y_test, test_batch[b"labels"])
    assert set(dataset.y_train.tolist()) <= set(range(10))
    assert dataset.num_classes == 10

    raw_train = np.concatenate([_expected_images(batch) for batch in train_batches])
    raw_test = _expected_images(test_batch)
    mean = raw_train.mean(axis=(0, 1, 2))
    std = raw_train.std(axis=(0, 1, 2))
    np.testing.assert_allclose(dataset.x_train, (raw_train - mean) / std, atol=1e-4)
    # The test split is normalised with the training statistics, not its own.
    np.testing.assert_allclose(dataset.x_test, (raw_test - mean) / std, atol=1e-4)
    np.testing.assert_allclose(dataset.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(dataset.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


@pytest.mark.parametrize("form", ["dir", "parent", "archive", "archive_parent"])
def test_cifar10_loader_reads_every_form(cifar10, form):
    path = {
        "dir": cifar10["dir"],
        "parent": cifar10["parent"],
        "archive": cifar10["archive"],
        "archive_parent": cifar10["archive"].parent,
    }[form]
    _check_cifar10(_data.load_cifar10(path), cifar10["written"])


def test_cifar10_loader_names_missing_files(tmp_path, cifar10):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch"):
        _data.load_cifar10(tmp_path / "nothing-here")
    (cifar10["dir"] / _data.CIFAR10_TEST_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        _data.load_cifar10(cifar10["dir"])


def test_cifar10_loader_rejects_an_archive_without_the_batches(tmp_path):
    archive = tmp_path / _data.CIFAR10_ARCHIVE
    other = tmp_path / "readme.txt"
    other.write_text("not CIFAR-10")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(other, arcname="readme.txt")
    with pytest.raises(FileNotFoundError, match="has no cifar-10-batches-py/data_batch_1"):
        _data.load_cifar10(archive)


def test_load_dataset_checks_its_arguments():
    with pytest.raises(ValueError, match="--data-dir"):
        _data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="dataset must be one of"):
        _data.load_dataset("mnist")


def test_digits_split_is_stratified_standardised_and_disjoint():
    from sklearn.datasets import load_digits

    dataset = _data.load_digits()
    raw = load_digits()
    assert dataset.x_train.shape == (1347, 8, 8, 1) and dataset.x_test.shape == (450, 8, 8, 1)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    np.testing.assert_allclose(dataset.x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(dataset.x_train.std(), 1.0, atol=1e-5)
    # Every class is in both splits in about the dataset's proportion.
    np.testing.assert_allclose(
        np.bincount(dataset.y_test) / 450, np.bincount(raw.target) / 1797, atol=0.01
    )
    # Undo the affine standardisation (train pixel values span the raw range 0..16): the
    # two splits together are the whole dataset, each image exactly once.
    low, high = dataset.x_train.min(), dataset.x_train.max()
    both = np.concatenate([dataset.x_train, dataset.x_test]).reshape(1797, 64)
    recovered = np.round((both - low) / (high - low) * 16)
    assert sorted(map(bytes, recovered.astype(np.uint8))) == sorted(
        map(bytes, raw.data.astype(np.uint8))
    )


@pytest.mark.slow  # a benchmark run
def test_benchmark_end_to_end_learns_and_writes_outputs(tmp_path):
    report = convergence.main(
        ["--epochs", "2", "--seeds", "1", "--out-dir", str(tmp_path), "--no-progress"]
    )
    results = report["results"]
    assert list(results) == list(convergence.OPTIMIZERS)
    for name, result in results.items():
        train_loss = np.asarray(result["curves"]["train_loss"])
        test_accuracy = np.asarray(result["curves"]["test_accuracy"])
        assert train_loss.shape == test_accuracy.shape == (1, 3)
        # From chance (loss near ln 10 = 2.3, accuracy near 0.1) to a trained model.
        assert train_loss[0, 0] > 1.5, name
        assert train_loss[0, -1] < 0.5 * train_loss[0, 0], name
        assert test_accuracy[0, -1] > 0.7, name
        assert result["final"]["test_accuracy"]["mean"] == pytest.approx(test_accuracy[0, -1])

    on_disk = json.loads((tmp_path / "convergence.json").read_text())
    assert {"dataset", "model", "epochs", "seeds", "command", "environment", "results"} <= set(
        on_disk
    )
    assert on_disk["results"]["lookahead_adam"]["k"] == 5
    assert set(on_disk["results"]["lookahead_sgd"]["vs_inner"]) == {
        "test_accuracy",
        "train_loss",
        "mean_train_loss",
    }
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "convergence.md").read_text()
    assert table.count("\n| ") == 1 + len(convergence.OPTIMIZERS)  # header row + one per run


@pytest.mark.slow  # a benchmark run
def test_benchmark_trains_the_cnn_on_a_cifar10_archive(tmp_path):
    # Two seeds: the CNN trains seed after seed (_epoch_step_by_step), not vmapped.
    _write_cifar10_batches(
        tmp_path / "cifar" / _data.CIFAR10_DIR,
        np.random.default_rng(1),
        train_per_batch=40,
        num_test=50,
        learnable=True,
    )
    report = convergence.main(
        [
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path / "cifar"),
            "--epochs",
            "3",
            "--seeds",
            "2",
            "--batch-size",
            "20",
            "--optimizers",
            "lookahead_adam",
            "--adam-lr",
            "3e-3",
            "--out-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert report["dataset"] == "cifar10" and report["model"] == "cnn"
    assert report["num_train"] == 200 and report["num_test"] == 50
    test_accuracy = np.asarray(report["results"]["lookahead_adam"]["curves"]["test_accuracy"])
    # Ten colour classes: chance is 0.1.
    assert test_accuracy.shape == (2, 4) and (test_accuracy[:, -1] > 0.5).all()
    assert (tmp_path / "out" / "convergence_cifar10.json").is_file()


@pytest.mark.slow  # trains the benchmark's MLP for an epoch
def test_lookahead_is_evaluated_at_its_slow_weights():
    # With k longer than the run there is no sync: the slow weights are still the initial
    # weights, so the measured loss and accuracy must be the initial ones, although the
    # fast weights (whose minibatch loss is also recorded) have trained.
    dataset = _data.load_digits()
    model = convergence.make_model("mlp", dataset.num_classes)
    initial_params = convergence.init_params(model, dataset, [0])
    initial_loss, initial_accuracy = convergence.measure_seeds(model, initial_params, dataset)
    tx = convergence.make_optimizer("lookahead_sgd", sgd_lr=0.1, adam_lr=1e-3, k=10_000, alpha=0.8)
    curves = convergence.train(
        dataset, model, tx, initial_params, seeds=[0], epochs=1, batch_size=32, progress=False
    )
    np.testing.assert_allclose(curves["train_loss"][:, -1], initial_loss, rtol=1e-5)
    np.testing.assert_allclose(curves["test_accuracy"][:, -1], initial_accuracy)
    assert curves["minibatch_loss"][0, -1] < 0.5 * initial_loss[0]


def test_default_output_is_not_the_committed_results():
    """CI runs `python benchmarks/convergence.py`: by default it writes to runs/, which git
    ignores, never over benchmarks/results/ (test_benchmark_end_to_end_learns_and_writes_outputs
    checks that main writes its files to --out-dir)."""
    repo = Path(__file__).resolve().parent.parent
    out_dir = Path(convergence.parse_args([]).out_dir).resolve()
    assert out_dir == repo / "runs"
    assert "/runs/" in (repo / ".gitignore").read_text().splitlines()
    assert Path(convergence.parse_args(["--out-dir", "x"]).out_dir) == Path("x")
