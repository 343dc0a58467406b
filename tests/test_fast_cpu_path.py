"""The fast CPU path: BatchNorm folded into convolutions (evaluation.folding, TorchEmbedder), onnxruntime
sessions without their growing memory arena, and per-sample work kept out of PyTorch's intra-op pool with
deliberate thread counts (core.threads, data.transforms.collate_faces)."""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import pytest
import torch
from test_validation_tinyface import one_torch_thread  # noqa: F401 (fixture: small tensors, shared cores)
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset, default_collate

from backbones import build_backbone
from core.config import AugmentConfig
from core.threads import fork_safe_opencv, loader_worker_init, thread_count
from data.decode import encode_jpeg
from data.image_folder import ImageFolderFaces
from data.sampler import GlobalBatchSampler, KeyedFaceDataset
from data.transforms import PRESETS, FaceDataset, FaceTransform, collate_faces
from evaluation import embedders
from evaluation.embedders import OnnxEmbedder, TorchEmbedder
from evaluation.extract import extract
from evaluation.folding import fold_batchnorm, foldable_pairs
from scripts import check_fork_opencv
from scripts.check_fork_opencv import exit_code_within
from tests.conftest import assert_close_scaled
from tests.synthetic_faces import write_identity_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_random_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm gets seeded non-trivial weights and running statistics, so a BatchNorm left out of
    (or folded wrongly into) its convolution changes the features far beyond float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
    return model.eval()


def faces(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, 14, 14), generator=g, dtype=torch.uint8).float()
    return nn.functional.interpolate(small, size=112, mode="bilinear").round().to(torch.uint8)


@pytest.fixture(scope="module")
def mbf() -> nn.Module:
    torch.manual_seed(0)
    return with_random_statistics(build_backbone("mbf"))


def test_folded_mobilefacenet_gives_the_eager_features(mbf):
    images = faces(2)
    before = {k: v.clone() for k, v in mbf.state_dict().items()}
    eager = TorchEmbedder(mbf, fast=False)(images)
    fast_embedder = TorchEmbedder(mbf)
    fast = fast_embedder(images)
    assert fast_embedder.fast_path == "BatchNorm folded (49 of 49)"
    assert fast_embedder.network(fast_embedder.prepare(images)) is not mbf
    # measured 1e-6 of the largest |feature| (float32 rounding of the folded weights)
    assert_close_scaled(fast, eager, 1e-4, msg="folded vs eager")
    for name, value in mbf.state_dict().items():  # the model itself is untouched
        assert torch.equal(value, before[name]), name
    # the statistics matter: the folded network without the biases the BatchNorms gave gets other features
    folded = fast_embedder.network(fast_embedder.prepare(images))
    for m in folded.modules():
        if isinstance(m, nn.Conv2d):
            m.bias = None
    with torch.no_grad():
        unnormalised = folded(fast_embedder.prepare(images))
    assert (unnormalised - eager).abs().max() > 0.1 * eager.abs().max()


def test_iresnet_folds_the_batchnorms_after_its_convolutions():
    """IResNet's blocks are BN -> conv -> BN -> PReLU -> conv -> BN (+ a conv -> BN shortcut): the first BN
    of a block reads the sum of the previous block, not a convolution, and stays."""
    torch.manual_seed(0)
    model = with_random_statistics(build_backbone("r18", input_size=48), seed=1)  # faces resized to 48
    images = faces(2)
    embedder = TorchEmbedder(model)
    fast = embedder(images)
    blocks = [m for m in model.modules() if type(m).__name__ == "IBasicBlock"]
    shortcuts = sum(1 for b in blocks if getattr(b, "downsample", None) is not None)
    expected = 1 + 2 * len(blocks) + shortcuts  # the stem conv's BN, conv1->bn2, conv2->bn3, shortcuts
    total = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    assert embedder.fast_path == f"BatchNorm folded ({expected} of {total})"
    assert_close_scaled(fast, TorchEmbedder(model, fast=False)(images), 1e-4, msg="folded r18 vs eager")


class Residual(nn.Module):
    """conv -> BN whose conv output is also added to the result: the BN must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Shared(nn.Module):
    """One conv called twice, once before a BN: folding it would change the other call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class Plain(nn.Module):
    def __init__(self, track: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=track), nn.PReLU(4)
        )
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1, bias=True), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).flatten(1)


def test_only_batchnorms_that_alone_read_a_convolution_are_folded():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert foldable_pairs(with_random_statistics(Plain()), x) == [("body.0", "body.1"), ("head.0", "head.1")]
    assert foldable_pairs(with_random_statistics(Residual()), x) == []
    assert foldable_pairs(with_random_statistics(Shared()), x) == []
    no_statistics = Plain(track=False).eval()  # normalises by the batch in eval mode too: kept
    folded, count = fold_batchnorm(no_statistics, x)
    assert (
        count == 1 and isinstance(folded.body[1], nn.BatchNorm2d) and isinstance(folded.head[1], nn.Identity)
    )
    for model in (with_random_statistics(Residual()), with_random_statistics(Shared()), no_statistics):
        folded, _ = fold_batchnorm(model, x)
        with torch.no_grad():
            assert_close_scaled(folded(x), model(x), 1e-5, msg=type(model).__name__)


def test_the_folded_copy_follows_weight_changes(mbf):
    import copy

    model = copy.deepcopy(mbf)
    embedder, images = TorchEmbedder(model), faces(2)
    first = embedder(images)
    with torch.no_grad():  # an optimiser step changes the weights in place
        model.layers[0].layers[0].weight.mul_(1.5)
        model.conv_sep.layers[1].running_var.mul_(2.0)
    second = embedder(images)
    assert (second - first).abs().max() > 0.01 * first.abs().max()
    assert_close_scaled(second, TorchEmbedder(model, fast=False)(images), 1e-4, msg="after the change")


def test_train_mode_other_precisions_and_failed_folds_run_the_model(mbf, monkeypatch, capsys):
    import copy

    images = faces(2)
    model = copy.deepcopy(mbf)
    embedder = TorchEmbedder(model)
    model.train()  # a caller that puts the model back into training: batch statistics, as before
    assert embedder.network(embedder.prepare(images)) is model and embedder.fast_path == "eager"
    model.eval()
    bf16 = TorchEmbedder(model, precision="bf16")
    assert bf16.network(bf16.prepare(images)) is model
    # a fold whose check fails: one line on stderr, and the model's own features
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.conv_sep.layers[0].weight.mul_(3.0)
    monkeypatch.setattr(embedders, "fold_batchnorm", lambda m, probe: (broken, 49))
    checked = TorchEmbedder(model)
    features = checked(images)
    assert "BatchNorm folding left off" in capsys.readouterr().err and checked.fast_path == "eager"
    assert torch.equal(features, TorchEmbedder(model, fast=False)(images))


def test_onnx_sessions_run_without_the_memory_arena_on_the_chosen_threads(shared_data):
    model = shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"
    embedder = OnnxEmbedder(model, verbose=False, threads=1)
    options = embedder.session.get_session_options()
    assert options.enable_cpu_mem_arena is False and options.intra_op_num_threads == 1
    assert OnnxEmbedder(model, verbose=False).session.get_session_options().intra_op_num_threads == (
        thread_count("batched")
    )


def test_extraction_keeps_no_batch_alive():
    """Nothing of a batch (its slice, its flip, the network input) outlives the batch: only the features
    are kept, so the memory of an evaluation is the images plus one batch."""
    import gc
    import weakref

    seen: list[weakref.ref] = []

    def embed(batch: torch.Tensor) -> torch.Tensor:
        x = batch.float()
        seen.extend((weakref.ref(batch), weakref.ref(x)))
        return x.mean(dim=(2, 3))

    images = torch.randint(0, 256, (40, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    original, _ = extract(embed, images, batch_size=8, flip=True)
    gc.collect()
    assert len(seen) == 20 and all(ref() is None for ref in seen)
    np.testing.assert_allclose(original, images.float().mean(dim=(2, 3)).numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- threads


def test_thread_counts_are_chosen_in_one_place():
    assert thread_count("per_sample") == 1
    assert thread_count(env={}, cores=16, load=0.3) == 16  # an idle machine: every core
    assert thread_count(env={}, cores=16, load=5.2) == 11  # the cores the other jobs leave
    assert thread_count(env={}, cores=2, load=1.0) == 1  # beside one CPU-bound process
    assert thread_count(env={}, cores=2, load=9.0) == 1
    assert thread_count(env={"LOCAL_WORLD_SIZE": "4"}, cores=16, load=0) == 4  # 4 processes share them
    assert thread_count(env={"OMP_NUM_THREADS": "3"}, cores=16, load=9.0) == 3  # the user's choice
    with pytest.raises(ValueError, match=r"OMP_NUM_THREADS='two' must be a positive integer"):
        thread_count(env={"OMP_NUM_THREADS": "two"})
    with pytest.raises(ValueError, match="thread role must be one of batched, per_sample"):
        thread_count("loader")


def test_the_load_of_other_processes_is_measured_now_without_this_process(monkeypatch):
    """other_load: every CPU's busy seconds over the window less this process's own CPU seconds, per
    second of the window (fixed readings here); the 1-minute load average only without /proc/stat."""
    from types import SimpleNamespace

    from core import threads

    readings = iter([(100.0, 400.0), (100.9, 400.8)])  # (busy, total) CPU seconds: 0.9 s busy in 0.4 s
    own = iter([5.0, 5.3])  # of which this process's own threads used 0.3 s
    clock = iter([10.0, 10.4])
    monkeypatch.setattr(threads, "_cpu_seconds", lambda: next(readings))
    fake_time = SimpleNamespace(process_time=lambda: next(own), perf_counter=lambda: next(clock),
                                sleep=lambda seconds: None)  # fmt: skip
    monkeypatch.setattr(threads, "time", fake_time)
    assert threads.other_load(0.4) == pytest.approx((0.9 - 0.3) / 0.4)  # 1.5 cores busy elsewhere
    monkeypatch.setattr(threads, "_cpu_seconds", lambda: None)
    monkeypatch.setattr(threads, "load_average", lambda: 7.0)
    assert threads.other_load() == 7.0


def test_this_machines_cpu_times_are_read():
    from core.threads import _cpu_seconds

    first = _cpu_seconds()
    busy_until = time.perf_counter() + 0.05
    while time.perf_counter() < busy_until:  # 50 ms of this process's work
        pass
    second = _cpu_seconds()
    assert first is not None and second is not None
    assert second[0] > first[0] and second[1] > first[1] >= first[0] > 0


class _Threads(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([torch.get_num_threads(), cv2.getNumThreads()])


def test_loader_workers_decode_with_one_thread_each():
    torch.set_num_threads(2)  # what a worker would inherit
    # the parent has used OpenCV's thread pool: a worker that resized its pool would wait forever
    cv2.resize(np.zeros((512, 512, 3), np.uint8), (256, 256))
    loader = DataLoader(
        _Threads(), batch_size=2, num_workers=1, worker_init_fn=loader_worker_init, timeout=60
    )
    (batch,) = list(loader)
    assert batch[:, 0].tolist() == [1, 1]


def _parallel_opencv_call() -> None:
    cv2.setNumThreads(2)  # the pool on, and used: a process forked now may inherit its lock held
    cv2.warpAffine(np.zeros((600, 600, 3), np.uint8), np.float32([[1, 0.1, 0], [0, 1, 0]]), (600, 600))


def test_a_process_forked_after_fork_safe_opencv_runs_opencv_without_the_pool():
    fork_safe_opencv()
    assert cv2.getNumThreads() == 1
    _parallel_opencv_call()  # code run later turns the pool back on ...
    pid = os.fork()
    if pid == 0:  # ... and the fork hook stopped it again: the child runs OpenCV on its own thread
        os._exit(cv2.getNumThreads())
    assert exit_code_within(pid, 60) == 1


def test_the_training_loader_stops_opencvs_pool_before_its_workers_fork(tmp_path):
    write_identity_folder(tmp_path, identities=2, per_identity=4, size=32)
    keyed = KeyedFaceDataset(
        FaceDataset(ImageFolderFaces(tmp_path), FaceTransform(AugmentConfig(), image_size=32)), seed=0
    )
    _parallel_opencv_call()
    keyed.loader(GlobalBatchSampler(len(keyed), 4, seed=0), num_workers=0)
    assert cv2.getNumThreads() == 2  # no worker to fork: the main process keeps OpenCV's threads
    loader = keyed.loader(GlobalBatchSampler(len(keyed), 4, seed=0), num_workers=1)
    assert cv2.getNumThreads() == 1  # stopped before any fork, whatever hooks this process has
    images, labels, _ = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() != [-1] * 4


class _Record(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# creating tensors, reading attributes, viewing numpy memory: nothing that runs in the intra-op pool
NO_KERNELS = {"__get__", "empty", "numpy", "tensor", "from_numpy", "as_tensor"}


def test_per_sample_work_stays_out_of_the_intra_op_pool():
    rng = np.random.default_rng(0)
    jpegs = [encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(8)]
    transform = FaceTransform(PRESETS["adaface"], seed=0)
    items = [(transform(b, f"face {i}", rng=np.random.default_rng([0, i])), torch.tensor(i), i, "")
             for i, b in enumerate(jpegs)]  # fmt: skip
    record = _Record()
    with record:
        for i, b in enumerate(jpegs):  # decode + every AdaFace augmentation
            transform(b, f"face {i}", rng=np.random.default_rng([1, i]))
        batch = collate_faces(items)
    assert record.names <= NO_KERNELS, record.names - NO_KERNELS
    expected = default_collate(items)  # the same batch as PyTorch's collate, which stacks with torch
    assert type(batch) is type(expected) and len(batch) == len(expected)
    for got, want in zip(batch, expected, strict=True):
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want)
        else:
            assert got == want
    with _Record() as probe:
        default_collate(items)
    assert "stack" in probe.names  # the probe sees the kernel the collate above avoids


def test_a_cpu_batch_goes_through_in_slices(mbf, shared_data):
    """Slices of cpu_batch images (faster on a CPU and a quarter of the memory); the same features as the
    whole batch at once."""
    sizes: list[int] = []
    hook = mbf.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])) and None)
    try:
        embedder = TorchEmbedder(mbf, fast=False)
        embedder.cpu_batch = 4
        images = faces(10)
        sliced = embedder(images)
    finally:
        hook.remove()
    assert sizes == [4, 4, 2]
    with torch.no_grad():
        whole = mbf(embedder.prepare(images))
    assert_close_scaled(sliced, whole, 1e-5, msg="slices vs one pass")
    onnx = OnnxEmbedder(shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx", verbose=False)
    onnx.cpu_batch = 4
    at_once = onnx.session.run(None, {onnx.input: onnx_input(images)})[0]
    assert_close_scaled(onnx(images).numpy(), at_once, 1e-5, msg="onnxruntime slices vs one pass")


def onnx_input(images: torch.Tensor) -> np.ndarray:
    return (images.float() / 127.5 - 1).numpy()


def test_the_fork_check_prints_its_counts_and_no_hung_child_with_the_pool_stopped(capsys):
    assert check_fork_opencv.main(["--trials", "4"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["trials"] == 4 and 0 <= row["hung_pool_running"] <= 4
    assert row["hung_fork_safe_opencv"] == 0
