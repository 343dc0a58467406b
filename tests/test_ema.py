"""The average of the backbone's weights (``train.ema``, ``objectives.ema``): the recursion written out, the
loop's hooks (after each step that counts, saved, validated beside the raw weights, best.pt by either),
exact resume, a checkpoint without an average, every objective, export and evaluation on request, and 2
processes equal to 1 with accumulation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import train
from backbones import build_backbone
from core.checkpoint import load_checkpoint
from core.config import ConfigError, load_config
from data.verification import load_bin
from evaluation.embedders import embedder_key, load_embedder
from objectives.ema import ModelEma
from tests.synthetic_faces import write_identity_folder, write_pairs_bin

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "cpu_tiny.yaml")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs on one thread: tiny convolutions gain nothing from two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ema")
    return {
        "root": root,
        "train": write_identity_folder(root / "train", identities=12, per_identity=8, seed=3),
        "val": write_pairs_bin(root / "val" / "lfw.bin", pairs=40).parent,
    }


def overrides(faces: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"data.root={faces['train']}", f"output_dir={out}", "data.image_size=32", "data.num_workers=0",
        "model.embedding_size=64", "model.input_size=16", "data.batch_size=8", "train.log_every=1", *extra,
    ]  # fmt: skip


EMA_ON = ("train.ema.enabled=true", "train.ema.warmup=none", "train.ema.decay=0.5")


def averaged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if v.is_floating_point()}


# ------------------------------------------------------------------------------------------ the average


def perturbed_step(model: nn.Module, generator: torch.Generator) -> None:
    """A stand-in for an optimizer step: new weights, and new BN statistics from a forward pass."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
        model.train()(torch.randn(6, 4, generator=generator) * 3 + 1)


@pytest.mark.parametrize("warmup", ["none", "power", "tf"])
def test_the_average_follows_the_recursion_written_out(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    decay, power = 0.6, 0.75
    ema = ModelEma(model, decay, warmup=warmup, warmup_power=power)
    generator = torch.Generator().manual_seed(1)
    # the update n takes d_n = 0 for n = 1, then decay, min(decay, 1 - n^-p) or min(decay, (1+n)/(10+n))
    written = {
        "none": [0.0, 0.6, 0.6, 0.6, 0.6],
        "power": [0.0, 1 - 2**-0.75, 1 - 3**-0.75, 0.6, 0.6],  # 0.405, 0.561, then 0.6 < 0.646, 0.701
        "tf": [0.0, 3 / 12, 4 / 13, 5 / 14, 6 / 15],
    }[warmup]
    expected: dict[str, torch.Tensor] = {}
    for n, d in enumerate(written, start=1):
        perturbed_step(model, generator)
        assert ema.update(model) == pytest.approx(d, abs=1e-12)
        weights = {k: v.double() for k, v in averaged(model.state_dict()).items()}
        expected = weights if n == 1 else {k: d * expected[k] + (1 - d) * weights[k] for k in weights}
        assert ema.updates == n
    got = ema.module.state_dict()
    assert set(averaged(got)) == set(expected) and "1.running_var" in expected  # BN statistics averaged
    for key, value in expected.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-6, atol=1e-6 * float(value.abs().max()))
        assert not torch.allclose(got[key].double(), averaged(model.state_dict())[key].double())
    assert (
        int(got["1.num_batches_tracked"]) == int(model.state_dict()["1.num_batches_tracked"]) == 5
    )  # copied
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_every_n_steps_updates_on_their_multiples_only():
    model = nn.Linear(3, 2)
    ema = ModelEma(model, 0.5, warmup="none", every=3)
    with torch.no_grad():
        model.weight.fill_(1.0)
    done = [ema.after_step(model, step) for step in range(1, 8)]
    assert done == [False, False, True, False, False, True, False] and ema.updates == 2


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.ema.select_best=ema", "train.ema.select_best ema needs train.ema.enabled: true"),
        ("train.ema.decay=1.0", "train.ema.decay must be a number in [0, 1), got 1.0"),
        ("train.ema.every=0", "train.ema.every must be an integer >= 1, got 0"),
        ("train.ema.device=cuda", "train.ema.device must be one of 'device', 'cpu', got 'cuda'"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(setting, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, [setting])
    assert message in str(err.value) and f"--set {setting}" in str(err.value)


# ------------------------------------------------------------------------------------------ in the loop

# the run of the fixture: power warm-up capped at 0.5, so the decays of updates 1, 2, 3 are 0, 1 - 2^(-2/3)
# and min(0.5, 1 - 3^(-2/3) = 0.519); dropout and class sampling make a resume depend on every draw
RUN_SET = (
    *EMA_ON, "train.ema.warmup=power", "train.ema.device=cpu", "model.dropout=0.2", "head.sample_rate=0.5",
    "train.max_steps=4", "train.keep_last=4",
)  # fmt: skip


def nan_at_step_3(monkeypatch) -> None:
    """Step 3 (``state.step`` 2 before it) has a NaN loss: it is skipped."""
    real = train.forward_loss

    def forward_loss(run, *batch):
        result = real(run, *batch)
        return result._replace(loss=result.loss * float("nan")) if run.state.step == 2 else result

    monkeypatch.setattr(train, "forward_loss", forward_loss)


@pytest.fixture(scope="module")
def ema_run(faces) -> Path:
    """4 steps with the average, step 3 skipped, a checkpoint after each, validation at steps 2 and 4."""
    out = faces["root"] / "ema_run"
    settings = overrides(faces, out, *RUN_SET, "train.save_every=1", f"data.val_root={faces['val']}",
                         "train.val_every=2")  # fmt: skip
    with pytest.MonkeyPatch.context() as monkeypatch:
        nan_at_step_3(monkeypatch)
        run = train.fit(load_config(CONFIG, settings))
    assert run.state.skipped_steps == 1
    return out


@pytest.fixture(scope="module")
def plain_run(faces) -> Path:
    """1 step without the average."""
    out = faces["root"] / "plain_run"
    train.fit(load_config(CONFIG, overrides(faces, out, "train.max_steps=1")))
    return out


def test_a_run_averages_after_each_step_that_counts_and_validates_both(ema_run):
    """Steps 1, 2 and 4 count, step 3 is skipped: the checkpoints' averages are the recursion over the
    checkpoints' raw weights, with one update per step that counted."""
    states = {n: load_checkpoint(ema_run / f"step_{n}.pt") for n in (1, 2, 3, 4)}
    expected = averaged(states[1]["backbone"])  # the first update copies the weights
    for n, d in ((2, 1 - 2 ** (-2 / 3)), (3, None), (4, 0.5)):  # step 3 skipped: no update
        raw = averaged(states[n]["backbone"])
        if d is not None:
            expected = {k: d * expected[k] + (1 - d) * raw[k] for k in raw}
        for key, value in expected.items():
            torch.testing.assert_close(states[n]["ema"]["backbone"][key], value, rtol=1e-6, atol=1e-7)
    assert [states[n]["ema"]["updates"] for n in (1, 2, 3, 4)] == [1, 2, 2, 3]
    last = states[4]
    moved = max(float((last["ema"]["backbone"][k] - last["backbone"][k]).abs().max()) for k in expected)
    assert moved > 1e-3  # the average is not the raw weights

    log = (ema_run / "train.log").read_text()
    lines = [line for line in log.splitlines() if "validation step" in line]
    assert len(lines) == 2 and all("; ema lfw " in line for line in lines), log
    raw_acc, ema_acc = (float(lines[-1].split(f"{p}lfw ")[1].split("±")[0]) for p in (": ", "ema "))
    assert last["validation"]["lfw"]["accuracy"] * 100 == pytest.approx(raw_acc, abs=0.01)
    assert last["ema"]["validation"]["lfw"]["accuracy"] * 100 == pytest.approx(ema_acc, abs=0.01)
    events = EventAccumulator(str(ema_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/lfw_accuracy", "val_ema/lfw_accuracy", "val_ema/mean_accuracy"} <= tags
    assert "train.ema: an average of the backbone's weights, decay 0.5, warmup power 0.6667" in log


@pytest.mark.parametrize("select_best", ["raw", "ema"])
def test_best_pt_follows_the_weights_select_best_names(select_best):
    # raw weights validate better and better, the average worse and worse: best.pt is the latest or the first
    cfg = load_config(CONFIG, [*EMA_ON, f"train.ema.select_best={select_best}"])
    model = nn.Linear(2, 2)
    run = SimpleNamespace(cfg=cfg, val_sets=["lfw"], state=train.TrainState(global_batch=8, seed=0),
                          ema=ModelEma(model, 0.5), backbone=model)  # fmt: skip

    def evaluate(run, model=None, device=None):
        step = run.state.step
        accuracy = 0.5 + 0.1 * step if model is None else 0.9 - 0.1 * step
        return {
            "lfw": {"accuracy": accuracy, "accuracy_std": 0.0, "val_at_far_1e-3": 0.0, "feature_norm": 1.0}
        }

    log = SimpleNamespace(scalars=lambda step, values: None, line=lambda text: None)
    best = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(train, "evaluate", evaluate)
        for step in (1, 2, 3):
            run.state.step = step
            best.append(train.validate_and_log(run, log))
    assert best == ([True, True, True] if select_best == "raw" else [True, False, False])
    assert run.state.best == pytest.approx(0.8)  # raw 0.5 + 0.3 at step 3, or the average's 0.9 - 0.1
    assert run.state.ema_validation["lfw"]["accuracy"] == pytest.approx(0.6)


def test_resume_with_an_average_equals_an_uninterrupted_run(faces, ema_run, tmp_path, monkeypatch):
    nan_at_step_3(monkeypatch)
    resumed = tmp_path / "resumed"
    train.fit(load_config(CONFIG, overrides(faces, resumed, *RUN_SET)), str(ema_run / "step_1.pt"))
    a, b = load_checkpoint(ema_run / "step_4.pt"), load_checkpoint(resumed / "last.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 3
    for sa, sb in ((a["backbone"], b["backbone"]), (a["ema"]["backbone"], b["ema"]["backbone"])):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_the_average_leaves_training_as_it_was(faces, plain_run, tmp_path):
    # the raw column of a run with the average is the run without it, bit for bit
    out = tmp_path / "run"
    train.fit(load_config(CONFIG, overrides(faces, out, *EMA_ON, "train.max_steps=1")))
    a, b = load_checkpoint(plain_run / "last.pt"), load_checkpoint(out / "last.pt")
    for entry in ("backbone", "head"):
        assert a[entry].keys() == b[entry].keys()
        assert all(torch.equal(a[entry][k], b[entry][k]) for k in a[entry]), entry


def test_a_checkpoint_without_an_average_resumes_with_one_and_back(faces, plain_run, ema_run, tmp_path):
    assert "ema" not in load_checkpoint(plain_run / "last.pt")  # off: the checkpoint keeps its old layout
    with_ema, without = tmp_path / "with_ema", tmp_path / "without"
    cfg = load_config(CONFIG, overrides(faces, with_ema, *EMA_ON, "train.max_steps=2"))
    train.fit(cfg, str(plain_run / "last.pt"))
    log = (with_ema / "train.log").read_text()
    assert "the checkpoint holds no train.ema average: it starts from the resumed weights" in log
    state = load_checkpoint(with_ema / "last.pt")
    assert state["ema"]["updates"] == 1  # started at the resumed weights; its first update copies
    for key, value in state["backbone"].items():
        assert torch.equal(state["ema"]["backbone"][key], value), key

    settings = [s for s in overrides(faces, without, *RUN_SET) if not s.startswith("train.ema")]
    train.fit(load_config(CONFIG, [*settings, "train.max_steps=5"]), str(ema_run / "last.pt"))
    assert (
        "train.ema is off: the checkpoint's average is not carried on" in (without / "train.log").read_text()
    )
    assert "ema" not in load_checkpoint(without / "last.pt")


def test_a_misfitting_average_is_refused_before_anything_loads(faces, ema_run, tmp_path, capsys):
    state = load_checkpoint(ema_run / "last.pt")
    first = next(iter(state["ema"]["backbone"]))
    del state["ema"]["backbone"][first]
    torch.save(state, tmp_path / "broken.pt")
    status = train.main(["--config", CONFIG, "--set", *overrides(faces, tmp_path / "next", *RUN_SET),
                         "--resume", str(tmp_path / "broken.pt")])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert "broken.pt: its train.ema average does not fit this run's model.backbone 'mbf'" in err
    assert f"1 keys missing ({first}, ...)" in err
    assert not (tmp_path / "next").exists()  # refused before the first write


# ------------------------------------------------------------------------------------- every objective


def test_the_metric_and_probface_objectives_keep_an_average(faces, plain_run, tmp_path):
    metric = tmp_path / "metric"
    triplet = ("head.name=none", "loss.name=triplet", "loss.params={margin: 0.3}", "data.sampler=pk")
    train.fit(load_config(CONFIG, overrides(faces, metric, *triplet, *EMA_ON, "train.max_steps=2")))
    state = load_checkpoint(metric / "last.pt")
    assert state["ema"]["updates"] == 2
    assert not all(torch.equal(state["ema"]["backbone"][k], v) for k, v in state["backbone"].items())

    # ProbFace trains its uncertainty module on a frozen backbone: the average of a backbone that does not
    # change is that backbone, bit for bit
    probface = tmp_path / "probface"
    pretrained = f"model.pretrained={plain_run / 'last.pt'}"
    settings = [*overrides(faces, probface, *EMA_ON, "train.max_steps=2"), "model.backbone=mbf", pretrained,
                "train.val_every=0", "data.val_root="]  # fmt: skip
    train.fit(load_config(str(ROOT / "configs" / "recipes" / "probface.yaml"), settings))
    state = load_checkpoint(probface / "last.pt")
    assert state["ema"]["updates"] == 2
    for key, value in load_checkpoint(plain_run / "last.pt")["backbone"].items():
        assert torch.equal(state["ema"]["backbone"][key], value), key
    assert "the backbone does not change, so its average equals it" in (probface / "train.log").read_text()


# ------------------------------------------------------------------------------ export and evaluation


def test_export_and_evaluation_take_the_average_on_request(faces, ema_run, plain_run, tmp_path, capsys):
    state = load_checkpoint(ema_run / "last.pt")
    images = torch.from_numpy(load_bin(faces["val"] / "lfw.bin").images[:8])
    for weights, entry in (("raw", state["backbone"]), ("ema", state["ema"]["backbone"])):
        model = build_backbone("mbf", embedding_size=64, input_size=16)
        model.load_state_dict(entry)
        loaded = load_embedder(ema_run / "last.pt", weights=weights)
        torch.testing.assert_close(loaded(images), train.TorchEmbedder(model)(images), rtol=0, atol=0)
        assert loaded.weights == weights
    raw, ema = (load_embedder(ema_run / "last.pt", weights=w)(images) for w in ("raw", "ema"))
    assert float((raw - ema).abs().max()) > 1e-3 * float(raw.abs().max())  # two different networks
    assert embedder_key(ema_run / "last.pt", load_embedder(ema_run / "last.pt", weights="ema")).endswith(
        "_ema"
    )

    with pytest.raises(
        ValueError, match=r"plain_run/last\.pt: holds no average of the weights .*leave out --use-ema"
    ):
        load_embedder(plain_run / "last.pt", weights="ema")
    from scripts import export_onnx

    assert not export_onnx.build_parser().parse_args(["a.pt", "b.onnx"]).use_ema
    status = export_onnx.main([str(plain_run / "last.pt"), str(tmp_path / "m.onnx"), "--use-ema"])
    assert status == 2 and "holds no average of the weights" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------- 2 processes


@pytest.mark.slow  # two torchrun processes and a 1-process run: ~30 s on 2 cores
def test_two_processes_keep_the_average_of_one_with_accumulation(faces, tmp_path):
    common = (*EMA_ON, "train.save_every=1", "optim.grad_clip=0", "train.max_steps=2", "train.epochs=2")
    one, two = tmp_path / "one", tmp_path / "two"
    train.fit(load_config(CONFIG, overrides(faces, one, *common, "optim.grad_accum=2")))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         "--config", CONFIG, "--set", *overrides(faces, two, *common)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the parameters of 1 and 2 processes agree to float noise that this chaotic tiny net amplifies per step
    # (tests/test_train_loop.py); their averages must agree as closely, relative to the step's update (BN
    # statistics are not compared: 1 process updates them with 2 micro-batches, each of 2 ranks with 1)
    a, b = (load_checkpoint(d / "step_2.pt") for d in (one, two))
    before = {
        k: v
        for k, v in averaged(load_checkpoint(one / "step_1.pt")["backbone"]).items()
        if "running" not in k
    }
    update = max(float((a["backbone"][k] - before[k]).abs().max()) for k in before)
    for key in before:
        assert float((a["ema"]["backbone"][key] - b["ema"]["backbone"][key]).abs().max()) < 0.02 * update, key
    assert a["ema"]["updates"] == b["ema"]["updates"] == 2
    # and the average is the recursion over the raw weights on 2 processes too
    for key in before:
        step1 = load_checkpoint(two / "step_1.pt")["backbone"][key]
        torch.testing.assert_close(
            b["ema"]["backbone"][key], 0.5 * step1 + 0.5 * b["backbone"][key], rtol=1e-6, atol=1e-7
        )
    assert math.isfinite(update) and update > 0
