"""More places where the framework follows, or deliberately leaves, its seeds' and peers' code
(docs/fidelity.md): input normalisation, the masked-face focal loss, the polynomial schedule, the
MegaFace protocol's noisy probes and self-matches, the closeness-diversity mining steps, AdaFace's
dropout and the face inference picks. Each reference rule is written out here from the reference's code."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import inference
import train
from core.config import ScheduleConfig, load_config
from core.optim import build_scheduler
from data.decode import decode_rgb
from data.transforms import normalize_batch
from data.verification import read_bin_raw
from face_alignment import align_face
from face_alignment.detector import Face
from mining.closeness_diversity import is_mining_step
from objectives.classification import Classification, build_classifier, build_criterion
from tests.synthetic_faces import write_identity_folder
from validation_megaface.protocol import rank1_identification, score_megaface

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs" / "recipes"


# ----------------------------------------------------------------------------- input normalisation


def test_one_normalisation_and_how_far_the_seeds_scalings_move_a_real_models_features(shared_data):
    """The framework feeds (x - 127.5) / 127.5 everywhere. ProbFace's (x - 128) / 128 and the
    closeness-diversity MegaFace script's (x - 127.5) / 128 barely move the features of a model trained on
    it (cosine > 0.998 on every face); the masked-face project's ImageNet mean/std does not fit it at all."""
    ort = pytest.importorskip("onnxruntime")
    jpegs, _ = read_bin_raw(shared_data / "lfw_yunet112.bin")
    faces = np.stack([decode_rgb(j).transpose(2, 0, 1) for j in jpegs[:16]])  # RGB uint8, 16 x 3 x 112 x 112
    x = faces.astype(np.float64)
    np.testing.assert_allclose(
        normalize_batch(torch.from_numpy(faces)).numpy(), (x - 127.5) / 127.5, atol=1e-6
    )

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = shared_data / "models" / "onnx" / "mobilefacenet_paddle_128d.onnx"
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    mean = np.array([0.485, 0.456, 0.406])[None, :, None, None] * 255
    std = np.array([0.229, 0.224, 0.225])[None, :, None, None] * 255

    def features(scaled: np.ndarray) -> np.ndarray:  # this model takes BGR
        out = session.run(None, {name: np.ascontiguousarray(scaled[:, ::-1], dtype=np.float32)})[0]
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    ours = features((x - 127.5) / 127.5)
    cosine = {
        "probface": (features((x - 128.0) / 128.0) * ours).sum(1),
        "cd_megaface": (features((x - 127.5) / 128.0) * ours).sum(1),
        "imagenet": (features((x - mean) / std) * ours).sum(1),
    }
    assert cosine["probface"].min() > 0.998 and cosine["cd_megaface"].min() > 0.998
    assert cosine["imagenet"].mean() < 0.5


# -------------------------------------------------------------------------- masked-face focal loss


def fyp_arcface_focal_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SamYuen101234/Masked_Face_Recognition@561bb9a arcface.py on margin logits: FocalLoss(gamma=2).forward
    returns ((1 - p)^2 logp).mean() (l.14-18); ArcFaceLoss multiplies that scalar by the batch's class
    weights and, with class_weights_norm 'batch' (main2.py l.46), divides their sum by the weights' sum
    (l.61-66)."""
    logp = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    focal = ((1 - torch.exp(-logp)) ** 2 * logp).mean()
    w = weight[labels]
    return (focal * w).sum() / w.sum()


def test_the_masked_recipes_focal_loss_is_the_fyps_whose_class_weights_cancel():
    cfg = load_config(RECIPES / "masked_arcface_focal.yaml")
    assert cfg.loss.name == "focal" and cfg.loss.class_weights == "none"
    counts = np.array([3, 40, 7, 120, 15])
    data_labels = np.repeat(np.arange(5), counts)
    loss = build_criterion(cfg, data_labels, num_classes=5)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=generator, dtype=torch.float64) * 8
    labels = torch.randint(0, 5, (12,), generator=generator)
    log_weights = 1 / np.log1p(counts)  # main2.py l.67-70
    fyp_weights = torch.from_numpy(log_weights / log_weights.sum() * 5)
    expected = fyp_arcface_focal_loss(logits, labels, fyp_weights)
    other = fyp_arcface_focal_loss(
        logits, labels, torch.rand(5, generator=generator, dtype=torch.float64) + 0.1
    )
    torch.testing.assert_close(other, expected, rtol=1e-12, atol=1e-12 * float(expected.abs()))  # they cancel
    got = loss(logits, labels)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs()))
    # asked for, the weights act on each sample's term, which the FYP's code never did
    weighted = load_config(
        RECIPES / "masked_arcface_focal.yaml", ["loss.class_weights=inverse_log_frequency"]
    )
    assert abs(float(build_criterion(weighted, data_labels, 5)(logits, labels)) - float(expected)) > 0.01


def test_the_masked_arcface_recipe_names_the_fyps_backbone_which_the_framework_lacks():
    """The FYP's main2.py l.31-32 and l.36: model_name 'effnet' (model.py l.86-87: EfficientNet-B3),
    pretrain False, pool 'gem'."""
    from backbones import list_backbones

    text = (RECIPES / "masked_arcface_focal.yaml").read_text()
    comment = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "EfficientNet-B3" in comment and "no EfficientNet" in comment
    assert not any("efficientnet" in name for name in list_backbones())
    assert load_config(RECIPES / "masked_arcface_focal.yaml").model.backbone == "r50"


def test_readme_triplet_examples_use_the_fyps_pk_batches():
    """README_TRAIN's masked triplet commands give PK batches of the FYP: its Code/main.py's 8 x 16 = 128
    (l.17, l.68), or 8 x 32 = 256, the nearest to its main.py's batches of 256 (l.15)."""
    lines = (ROOT / "README_TRAIN.md").read_text().splitlines()
    commands = [
        line.split("#")[0]
        for line in lines
        if "masked_triplet" in line and line.startswith(("python", "DATASET"))
    ]
    assert len(commands) >= 2
    for command in commands:
        sets = command.split("--set")[1].split() if "--set" in command else []
        data = load_config(
            RECIPES / "masked_triplet.yaml", [s for s in sets if not s.startswith("data.root")]
        ).data
        assert (data.batch_size, data.pk_k) in {(128, 16), (256, 32)}, command


# ------------------------------------------------------------------------------- polynomial schedule


def polynomial_lr_warmup(base: float, warmup: int, total: int, power: float, steps: int) -> list[float]:
    """The rate of each optimizer step under deepinsight/insightface recognition/arcface_torch/lr_scheduler.py
    PolynomialLRWarmup (default power 1.0, l.7), stepped once after every optimizer step as train_v2.py does:
    the first step keeps the optimizer's rate (last_epoch 0, l.19-20), then base * k / warmup up to k =
    warmup (l.22-23), then the previous rate times the ratio of consecutive (1 - (k - w) / (t - w))^power
    (l.24-28)."""
    rates, lr = [], base
    for k in range(steps):
        if k == 0 or k > total:
            pass
        elif k <= warmup:
            lr = base * k / warmup
        else:
            lr = (
                lr
                * ((1.0 - (k - warmup) / (total - warmup)) / (1.0 - (k - 1 - warmup) / (total - warmup)))
                ** power
            )
        rates.append(lr)
    return rates


def our_rates(cfg: ScheduleConfig, base: float, steps_per_epoch: int, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_polynomial_schedule_is_arcface_torchs_polynomial_lr_warmup():
    assert ScheduleConfig().power == 1.0
    for recipe in ("arcface", "cosface", "webface42m_pfc"):
        schedule = load_config(RECIPES / f"{recipe}.yaml").schedule
        assert (schedule.name, schedule.power, schedule.warmup_epochs) == ("polynomial", 1.0, 0.0), recipe
    base, total = 0.1, 60
    ours = our_rates(load_config(RECIPES / "arcface.yaml").schedule, base, 12, total)
    theirs = polynomial_lr_warmup(base, 0, total, 1.0, total)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12 * base)
    assert ours[total // 2] == pytest.approx(base / 2)  # linear: half the rate half-way
    # with a warm-up of w steps both reach the full rate at step w and decay alike after it; during the
    # warm-up step k takes (k + 1) / w here and k / w there (after a first step at the full rate)
    warm = ScheduleConfig(name="polynomial", warmup_epochs=1.0)
    ours, theirs = our_rates(warm, base, 12, total), polynomial_lr_warmup(base, 12, total, 1.0, total)
    np.testing.assert_allclose(ours[12:], theirs[12:], rtol=1e-9, atol=1e-12 * base)
    np.testing.assert_allclose(ours[:11], theirs[1:12], rtol=1e-12)
    assert theirs[0] == base and ours[0] == pytest.approx(base / 12)
    # power 2, arcface_torch's PolyScheduler of 2022, is one setting away
    squared = ScheduleConfig(name="polynomial", power=2.0)
    np.testing.assert_allclose(
        our_rates(squared, base, 12, total), polynomial_lr_warmup(base, 0, total, 2.0, total), rtol=1e-9
    )


def test_compare_heads_can_run_adaface_with_the_centres_of_the_readme_rows():
    """README's heads table: adaface and frabsm were measured from N(0, 0.01) centres, now unit ones; the
    command it gives adds head.params.init=normal_0.01 after the head's own parameters."""
    from scripts.compare_heads import HEADS

    demo = ROOT / "configs" / "demo_cpu.yaml"
    for head in ("adaface", "frabsm"):
        now = build_classifier(load_config(demo, HEADS[head]), num_classes=4)
        before = load_config(demo, [*HEADS[head], "head.params.init=normal_0.01"])
        assert now.head.init == "unit" and build_classifier(before, 4).head.init == "normal_0.01"


# ----------------------------------------------------------------------------------- MegaFace protocol


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def megaface_case(seed: int = 3):
    """Unit features of 6 identities x 6 probes (one of identity 0's probes shows identity 1: a FaceScrub
    noise) and 300 distractors."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 16))
    ids = np.repeat(np.arange(6), 6)
    shown = ids.copy()
    shown[2] = 1  # a mislabelled probe
    probes = unit(centres[shown] + rng.normal(scale=0.8, size=(len(ids), 16)))
    noisy = np.zeros(len(ids), dtype=bool)
    noisy[2] = True
    return probes, ids, noisy, unit(rng.normal(size=(300, 16))), rng


def cd_rank1(probes: np.ndarray, ids: np.ndarray, distractors: np.ndarray) -> tuple[int, int]:
    """Zacharynjust/FR-closeness-and-diversity@55a2aa8 eval/eval_megaface.py compute_rank_1 (l.122-142):
    per identity, every probe's same-identity scores above its best distractor score, minus 1 for itself."""
    tp = total = 0
    for identity in np.unique(ids):
        group = probes[ids == identity]
        best = (group @ distractors.T).max(1)
        intra = group @ group.T
        total += len(group) * (len(group) - 1)
        tp += sum(int((intra[i] > best[i]).sum()) - 1 for i in range(len(group)))
    return tp, total


def cd_genuine_histogram(
    probes: np.ndarray, ids: np.ndarray, distractors: np.ndarray, bins: int
) -> np.ndarray:
    """compute_roc (l.67-106): every probe against the gallery of all probes and distractors, genuine = same
    label, itself included; then pos_bins[-1] -= num_probe removes the self-matches from the last bin."""
    gallery = np.concatenate([probes, distractors])
    labels = np.concatenate([ids, np.full(len(distractors), -1)])
    scores = (probes.astype(np.float64) @ gallery.T.astype(np.float64))[ids[:, None] == labels[None, :]]
    index = np.clip(np.floor((scores + 1) * bins / 2), 0, bins - 1).astype(int)
    counts = np.bincount(index, minlength=bins)
    counts[-1] -= len(probes)
    return counts, scores


def test_megaface_drops_noisy_probes_and_removes_self_matches_as_the_closeness_diversity_code():
    probes, ids, noisy, distractors, rng = megaface_case()
    # prepare_probe (l.179-219) leaves the noise-listed FaceScrub files out, as list_facescrub does
    kept, kept_ids = probes[~noisy], ids[~noisy]
    scores = score_megaface(kept, kept_ids, distractors, bins=20)
    _, successes, pairs = rank1_identification(kept, kept_ids, scores.max_distractor)
    assert (successes, pairs) == cd_rank1(kept, kept_ids, distractors)
    assert 0 < successes < pairs
    expected, genuine = cd_genuine_histogram(kept, kept_ids, distractors, bins=20)
    edges = np.linspace(-1, 1, 21)
    assert np.abs(genuine[:, None] - edges[None, 1:-1]).min() > 1e-5  # float32 rounding decides no bin
    np.testing.assert_array_equal(scores.genuine, expected)
    # insightface's remove_noises.py instead replaces a noisy probe by its identity's centre (the sum of
    # the clean features plus U(-0.001, 0.001) noise, normalised): kept as a probe, and easily matched
    replaced = probes.copy()
    centre = probes[(ids == 0) & ~noisy].sum(0) + rng.uniform(-0.001, 0.001, size=probes.shape[1])
    replaced[2] = centre / np.linalg.norm(centre)
    insightface = score_megaface(replaced, ids, distractors, bins=20)
    _, their_successes, their_pairs = rank1_identification(replaced, ids, insightface.max_distractor)
    assert their_pairs > pairs and their_successes / their_pairs > successes / pairs


# --------------------------------------------------------------------- closeness-diversity mining steps


def cd_code_mining_steps(stage1_steps: int, stage2_steps: int, interval: int = 5) -> list[int]:
    """FR-closeness-and-diversity@55a2aa8 train.py: global_step resumes at the stage-1 checkpoint's
    GLOBAL_STEP + 1 (l.97; pretrain.py saves the index of its last step, l.123-125), and a step mines when
    global_step % interval == 0 (l.147) before global_step += 1 (l.168)."""
    global_step = (stage1_steps - 1) + 1
    mined = []
    for _ in range(stage2_steps):
        if global_step % interval == 0:
            mined.append(global_step)
        global_step += 1
    return mined


def test_mining_steps_are_the_method_codes():
    for stage1 in (0, 3, 7, 10):
        expected = cd_code_mining_steps(stage1, 23)
        assert [s for s in range(stage1, stage1 + 23) if is_mining_step(s, 5)] == expected
    assert not any(is_mining_step(s, 0) for s in range(10))


def test_train_py_mines_on_steps_0_and_3(tmp_path, monkeypatch):
    faces = write_identity_folder(tmp_path / "faces", identities=6, per_identity=4)
    mined: list[int] = []
    monkeypatch.setattr(
        Classification, "add_mined_gradient", lambda self, context, batch: mined.append(context.step)
    )
    settings = [
        f"data.root={faces}", f"output_dir={tmp_path / 'run'}", "data.image_size=32", "data.batch_size=8",
        "data.num_workers=0", "data.val_root=", "model.embedding_size=32", "train.max_steps=4",
        "train.save_every=0", "train.val_every=0", "mining.difficulty=true", "mining.cd_interval=3",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: more threads only spin on a busy machine
    try:
        assert train.main(["--config", str(ROOT / "configs" / "cpu_tiny.yaml"), "--set", *settings]) == 0
    finally:
        torch.set_num_threads(threads)
    assert mined == [0, 3]  # (step + 1) % 3 == 0 would give [2]


# --------------------------------------------------------------------------------- AdaFace dropout


def test_adaface_recipes_drop_out_before_the_embedding_fc_as_adafaces_net():
    """mk-minchul/AdaFace net.py l.298-301 (and Xkf0/FRABSM's): BN2d - Dropout(0.4) - Flatten - Linear -
    BN1d; IResNet's dropout sits between the flattened map and the FC as well."""
    for recipe in ("adaface", "frabsm", "nfrabsm"):
        cfg = load_config(RECIPES / f"{recipe}.yaml", ["model.backbone=r18", "model.precision=fp32"])
        assert cfg.model.dropout == 0.4, recipe
    model = train.build_model(cfg).train()
    seen = {}
    model.fc.register_forward_pre_hook(lambda module, args: seen.setdefault("fc_input", args[0]))
    torch.manual_seed(0)
    model(torch.randn(2, 3, 112, 112))
    zeros = float((seen["fc_input"] == 0).float().mean())
    assert 0.35 < zeros < 0.45  # 40% of the 25,088 inputs of the FC dropped


# ---------------------------------------------------------------------------------------- inference


class TwoFaces:
    """A detector that finds a small face with a high score and a large one with a lower score."""

    def detect(self, image: np.ndarray) -> list[Face]:
        small_marks = np.array([[18, 20], [32, 20], [25, 27], [19, 33], [31, 33]], float)
        large_marks = np.array([[90, 55], [130, 55], [110, 75], [94, 97], [126, 97]], float)
        small = Face(np.array([10.0, 10, 40, 40]), 0.99, small_marks)
        large = Face(np.array([60.0, 20, 160, 120]), 0.70, large_marks)
        return [small, large]  # highest score first, as YuNetDetector.detect


def test_inference_takes_the_largest_face_not_the_highest_scoring(tmp_path):
    """AdaFace's inference (face_alignment/align.py get_aligned_face: MTCNN align_multi(img, limit=1)) takes
    the first face after MTCNN's score-ordered NMS; inference.py takes the largest box."""
    photo = np.random.default_rng(0).integers(0, 256, size=(180, 200, 3), dtype=np.uint8)
    path = tmp_path / "two.png"
    cv2.imwrite(str(path), photo[:, :, ::-1])
    small, large = TwoFaces().detect(photo)
    crop = inference.detected_crop(path, TwoFaces())
    np.testing.assert_array_equal(crop, align_face(photo, large.landmarks).transpose(2, 0, 1))
    assert not np.array_equal(crop, align_face(photo, small.landmarks).transpose(2, 0, 1))
