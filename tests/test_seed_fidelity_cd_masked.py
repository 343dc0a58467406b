"""Where the closeness-diversity and masked-face parts follow their reference code, checked against direct
implementations of that code's rules (docs/fidelity.md lists what departs and why)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.config import load_config
from data.sampler import PKBatchSampler
from heads.partial_fc import PartialFC
from mining import DifficultyScores
from mining.closeness_diversity import ClosenessDiversityMiner
from validation_hq import masked

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# ------------------------------------------------------------------------------ diversity prototypes


def _hard_negatives_by_hand(cos: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per sample, the k highest-cosine classes other than its own (its target set to -1, as the method's
    head does before its top-k)."""
    masked = cos.copy()
    masked[np.arange(len(labels)), labels] = -np.inf
    return np.argsort(-masked, axis=1, kind="stable")[:, :k]


def _prototype_ids_by_hand(
    hard: np.ndarray, labels: np.ndarray, selected: np.ndarray, rule: str
) -> list[int]:
    if rule == "last":
        # the released code: {label: row for label, row in zip(labels, rows)} keeps each class's last row
        per_class = dict(zip(labels.tolist(), hard, strict=True))
        rows = [per_class[c] for c in selected.tolist()]
    else:
        rows = [hard[i] for i in range(len(labels)) if labels[i] in set(selected.tolist())]
    union = {int(c) for row in rows for c in row}
    return sorted(union - set(selected.tolist()))


@pytest.mark.parametrize("rule", ["last", "all"])
def test_diversity_prototypes_follow_the_rule_written_out(rule):
    torch.manual_seed(0)
    num_classes, dim, negatives = 40, 16, 6
    labels = torch.tensor([3, 7, 3, 11, 7, 3, 20, 11, 5, 7, 3, 20])  # classes repeat within the batch
    embeddings = torch.randn(len(labels), dim)
    classifier = PartialFC("arcface", dim, num_classes, init_seed=0)
    cosines = classifier.scores(embeddings, labels, keep_cosines=True).cosines
    selected = np.array([3, 7, 20])
    miner = ClosenessDiversityMiner({}, negatives=negatives, prototype_rows=rule)
    got = miner.prototypes(classifier, cosines, selected, labels, torch.device("cpu"))

    weight = classifier.head.weight.detach()
    cos = (F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T).numpy()
    hard = _hard_negatives_by_hand(cos, labels.numpy(), negatives)
    ids = _prototype_ids_by_hand(hard, labels.numpy(), selected, rule)
    torch.testing.assert_close(got, weight[ids], rtol=0, atol=0)
    # the two rules differ on this batch, so the test tells them apart
    other = _prototype_ids_by_hand(hard, labels.numpy(), selected, "all" if rule == "last" else "last")
    assert len(other) != len(ids)


def test_seed_prototype_rule_is_the_default_and_bad_rule_is_refused():
    assert ClosenessDiversityMiner({}).prototype_rows == "last"
    with pytest.raises(ValueError, match=r"mining\.cd_prototypes must be one of last, all, got 'first'"):
        ClosenessDiversityMiner({}, prototype_rows="first")


def test_cd_prototypes_key_reaches_the_miner():
    from objectives.base import TrainingData
    from objectives.classification import build_miner

    data = TrainingData(np.zeros(0, dtype=np.int64), 0, dict, None, None, torch.device("cpu"))
    for rule in ("last", "all"):
        cfg = load_config(CONFIGS / "recipes" / "cd_stage2.yaml", [f"mining.cd_prototypes={rule}"])
        assert build_miner(cfg, data).prototype_rows == rule
    assert load_config(CONFIGS / "recipes" / "cd_stage2.yaml").mining.cd_prototypes == "last"


# ------------------------------------------------------------------------------ difficulty scores


def _seed_scores(start: np.ndarray, steps: list[list[np.ndarray]], cosines: list[list[np.ndarray]],
                 reduce_every: int) -> list[np.ndarray]:  # fmt: skip
    """The released code's rule: every rank folds its own batch into its own copy with momentum 0.9, and
    every ``reduce_every`` steps the copies are replaced by their mean (an all-reduce sum of copies / W).
    Returns the (identical) copies after each reduction."""
    world = len(steps[0])
    copies = [start.astype(np.float32).copy() for _ in range(world)]
    reduced = []
    for step, (batches, cos) in enumerate(zip(steps, cosines, strict=True)):
        for rank in range(world):
            idx = batches[rank]
            copies[rank][idx] = 0.9 * copies[rank][idx] + 0.1 * cos[rank]
        if step % reduce_every == reduce_every - 1:
            mean = sum(c / world for c in copies)
            copies = [mean.copy() for _ in range(world)]
            reduced.append(mean)
    return reduced


@pytest.mark.parametrize("reduce_every", [1, 4])  # stage 1 reduces every step, stage 2 every 100
def test_seed_score_averaging_equals_an_ema_with_momentum_one_minus_a_tenth_over_world(reduce_every):
    world, per_rank, images, epochs = 4, 3, 48, 3
    rng = np.random.default_rng(0)
    steps, cosines = [], []
    for _ in range(epochs):  # every image once per epoch, as a distributed sampler deals them
        order = rng.permutation(images).reshape(-1, world, per_rank)
        steps += [list(step) for step in order]
        cosines += [list(rng.uniform(-0.2, 0.9, (world, per_rank))) for _ in order]
    ours = DifficultyScores(images, momentum=1 - 0.1 / world, seed=3)
    plain = DifficultyScores(images, momentum=0.9, seed=3)
    seed_like = _seed_scores(ours.scores.numpy(), steps, cosines, reduce_every)
    after = []
    for step, (batches, cos) in enumerate(zip(steps, cosines, strict=True)):
        for s in (ours, plain):  # one process sees the whole global batch
            s.update(torch.from_numpy(np.concatenate(batches)), torch.from_numpy(np.concatenate(cos)).float())
        if step % reduce_every == reduce_every - 1:
            after.append(ours.scores.numpy().copy())
    for got, want in zip(after, seed_like, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the default momentum (0.9 on the whole global batch) is a different, faster average
    assert np.abs(plain.scores.numpy() - seed_like[-1]).max() > 0.05


# ------------------------------------------------------------------------------ masked pair test


def _fyp_threshold(dist1: np.ndarray, dist2: np.ndarray) -> float:
    """The masked-face FYP's ``evalulate`` (test.py), line for line, with numpy's histogram (what
    ``plt.hist`` calls)."""
    span = [np.floor(np.min([dist1.min(), dist2.min()])), np.ceil(np.max([dist1.max(), dist2.max()]))]
    same_hist = np.histogram(dist1, 100, range=span)
    diff_hist = np.histogram(dist2, 100, range=span)
    difference = (same_hist[0] - diff_hist[0]).astype(float)
    difference[: same_hist[0].argmax()] = np.inf
    difference[diff_hist[0].argmax() :] = np.inf
    first = np.where(difference <= 0)[0].min()
    return (same_hist[1][first] + same_hist[1][first - 1]) / 2


@pytest.mark.parametrize("seed", range(8))
def test_crossing_threshold_by_default_is_the_fyp_rule(seed):
    rng = np.random.default_rng(seed)
    n_same, n_diff = rng.integers(100, 3000, size=2)
    same = np.clip(rng.normal(rng.uniform(0.5, 0.9), rng.uniform(0.08, 0.2), n_same), 0, 2)
    diff = np.clip(rng.normal(rng.uniform(1.1, 1.5), rng.uniform(0.08, 0.2), n_diff), 0, 2)
    same[:4] = [0.5, 0.5, 1.0, 1.02]  # on bin edges, repeated
    if seed == 7:
        diff = np.round(diff, 1)  # many empty bins between the counts: an empty bin counts as a crossing
    result = masked.crossing_threshold(same, diff)
    want = _fyp_threshold(same, diff)
    width = result["edges"][1] - result["edges"][0]
    assert result["rule"] == "first"
    assert result["threshold"] == pytest.approx(want, rel=1e-12, abs=1e-9 * width)
    if seed != 7:  # without gaps, the least-difference rule lands within a few bins of it
        least = masked.crossing_threshold(same, diff, rule="least")["threshold"]
        assert abs(least - want) <= 3 * width + 1e-12


def test_crossing_threshold_where_the_fyp_code_fails():
    # the same pairs outnumber the different ones up to the different pairs' mode: the FYP's code raises
    # (no crossing before that mode); the search continues to the mode's bin
    same = np.r_[np.full(50, 0.405), np.full(40, 0.415)]
    diff = np.r_[np.full(45, 0.415), np.full(20, 0.995)]
    with pytest.raises(ValueError):
        _fyp_threshold(same, diff)
    result = masked.crossing_threshold(same, diff)
    assert result["bin"] == 41 and result["threshold"] == pytest.approx(0.405, rel=1e-12)
    # an inseparable model (the same pairs' mode above the different pairs'): the whole range is searched,
    # and its empty first bin is a crossing: every pair is called different
    result = masked.crossing_threshold(np.full(10, 1.5), np.full(10, 0.5))
    assert not result["separated"] and result["bin"] == 0 and result["threshold"] == pytest.approx(-0.01)
    every_bin = (np.arange(100) + 0.5) / 100  # 3 same pairs in every bin, 2 different ones in one
    with pytest.raises(ValueError, match="never falls to the different-pair one"):
        masked.crossing_threshold(np.repeat(every_bin, 3), np.full(2, 0.505))
    with pytest.raises(ValueError, match="crossing rule must be one of first, least, got 'mid'"):
        masked.crossing_threshold(np.ones(3), np.zeros(3), rule="mid")


# ------------------------------------------------------------------------------ recipes and launchers


def _recipe(name: str, *overrides: str):
    return load_config(CONFIGS / "recipes" / f"{name}.yaml", list(overrides))


def test_closeness_diversity_recipes_match_the_method_code():
    # config.py: 'pretrain' END_EPOCH 4 and 'default' END_EPOCH 24, both trained with range(start,
    # END_EPOCH + 1); BATCH_SIZE 512 in all, split over its 4 GPUs; IR_100 with Dropout(0.4), fp32
    stage1, stage2 = _recipe("cd_stage1"), _recipe("cd_stage2")
    assert (stage1.train.epochs, stage2.train.epochs) == (4 + 1, 24 + 1)
    for cfg in (stage1, stage2):
        assert cfg.schedule.name == "multistep" and cfg.schedule.milestones == [10, 18, 22]
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
        assert cfg.optim.grad_clip == 0.0 and cfg.model.precision == "fp32" and cfg.model.dropout == 0.4
        assert cfg.data.batch_size * 4 == 512 and cfg.head.params == {
            "s": 64.0,
            "m": 0.5,
            "variant": "fallback",
        }
    m = stage2.mining
    assert (m.cd_interval, m.cd_classes, m.cd_easy, m.cd_hard, m.cd_negatives) == (5, 64, 7, 1, 500)
    assert (m.cd_weight_closeness, m.cd_weight_diversity, m.cd_prototypes) == (0.5, 1.0, "last")


def test_masked_recipes_match_the_fyp_code():
    # main2.py (ArcFace): batch 128, dropout 0.4, lr 0.1, 25 epochs; main.py / Code/main.py (triplet):
    # dropout 0.3, 100 epochs, Code/main.py's PK batches of 8 x 16 = 128; neither clips nor uses fp16
    arcface, triplet = _recipe("masked_arcface_focal"), _recipe("masked_triplet")
    assert (arcface.model.dropout, arcface.data.batch_size, arcface.train.epochs) == (0.4, 128, 25)
    assert arcface.schedule.milestones == [5, 10, 15, 20] and arcface.optim.nesterov
    assert (triplet.model.dropout, triplet.data.batch_size, triplet.data.pk_k) == (0.3, 128, 16)
    for cfg in (arcface, triplet):
        assert cfg.optim.grad_clip == 0.0 and cfg.model.precision == "fp32"


@pytest.mark.parametrize(
    ("document", "recipe", "global_batch"),
    [
        ("scripts/train_cd.sh", "cd_stage1", 512),
        ("scripts/train_masked_arcface_focal.sh", "masked_arcface_focal", 128),
        ("scripts/train_masked_triplet.sh", "masked_triplet", 128),
        ("docs/masked_faces.md", "masked_arcface_focal", 128),
    ],
)
def test_launcher_examples_keep_the_recipes_global_batch(document, recipe, global_batch):
    # the global batch is data.batch_size x NPROC: every example with NPROC must give the reference batch
    examples = [line for line in (ROOT / document).read_text().splitlines() if "NPROC=" in line]
    assert examples
    for line in examples:
        nproc = int(re.search(r"NPROC=(\d+)", line)[1])
        given = re.search(r"data\.batch_size=(\d+)", line)
        batch = int(given[1]) if given else _recipe(recipe).data.batch_size
        assert nproc * batch == global_batch, f"{document}: {line.strip()}"


def test_triplet_epoch_against_the_fyp_sampler_epoch():
    # an epoch here: every identity once with pk_k images; the FYP's PKSampler (p 20, k 30) draws
    # ceil(N / 600) * 600 images per epoch. CASIA-WebFace-like: about 46 images per identity.
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 92, size=800)
    start = np.r_[0, np.cumsum(sizes)[:-1]]
    positions = {c: np.arange(s, s + n) for c, (s, n) in enumerate(zip(start, sizes, strict=True))}
    cfg = _recipe("masked_triplet")
    sampler = PKBatchSampler(positions, cfg.data.batch_size, cfg.data.pk_k)
    ours = len(sampler.order(0))
    fyp = ((sizes.sum() - 1) // 600 + 1) * 600
    assert ours == len(positions) // 8 * 8 * 16
    ratio = ours / fyp
    assert ratio == pytest.approx(16 / sizes.mean(), rel=0.02)
    assert 0.32 <= ratio <= 0.37  # the recipe's "100 epochs are about 34 of the FYP's"
    assert cfg.train.epochs * ratio == pytest.approx(34, abs=3)
    assert 290 * ratio == pytest.approx(100, rel=0.08)  # its `--set train.epochs=290`
