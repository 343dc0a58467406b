from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data.image_folder import ImageFolderFaces
from mining import DifficultyScores, EasyHardSampler, PKSampler, top_negative_classes
from tests.conftest import rendezvous


def test_scores_ema_closed_form_and_state_dict():
    s = DifficultyScores(5, seed=1)
    start = s.scores.clone()
    assert ((start >= 0) & (start < 1)).all()
    s.update(torch.tensor([1, 3, 3]), torch.tensor([0.5, -0.2, 0.4]))
    expected = start.clone()
    expected[1] = 0.9 * start[1] + 0.1 * 0.5
    expected[3] = 0.9 * start[3] + 0.1 * 0.1  # the same image twice: mean of its cosines
    torch.testing.assert_close(s.scores, expected)
    restored = DifficultyScores(5, seed=99)
    restored.load_state_dict(s.state_dict())
    assert torch.equal(restored.scores, s.scores)
    with pytest.raises(ValueError, match=r"image index 5 outside \[0, 5\)"):
        s.update(torch.tensor([5]), torch.tensor([0.1]))


def _scores_worker(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=rendezvous(out), rank=rank, world_size=2)
    try:
        s = DifficultyScores(8, seed=0)
        idx = torch.tensor([[0, 2, 5], [2, 6, 7]])[rank]
        cos = torch.tensor([[0.9, 0.1, -0.3], [0.5, 0.2, 0.7]])[rank]
        s.update(idx, cos)
        torch.save(s.scores, Path(out) / f"scores{rank}.pt")
        dist.barrier()  # nobody tears the group down while another rank still uses it
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_identical_scores_equal_to_one_process(tmp_path):
    mp.spawn(_scores_worker, args=(str(tmp_path),), nprocs=2, join=True)
    single = DifficultyScores(8, seed=0)
    single.update(torch.tensor([0, 2, 5, 2, 6, 7]), torch.tensor([0.9, 0.1, -0.3, 0.5, 0.2, 0.7]))
    for rank in range(2):
        torch.testing.assert_close(
            torch.load(tmp_path / f"scores{rank}.pt", weights_only=True), single.scores
        )


def test_easy_hard_sampler_uses_the_threshold():
    # class 0: images 0-9 with scores 0.05..0.95; class 1: images 10-13 all easy (0.8)
    scores = np.concatenate([np.linspace(0.05, 0.95, 10), np.full(4, 0.8)])
    positions = {0: np.arange(0, 10), 1: np.arange(10, 14)}
    sampler = EasyHardSampler(positions, num_easy=3, num_hard=1, num_probe=50_000)
    rng = np.random.default_rng(0)
    tau = sampler.threshold(scores, np.random.default_rng(0))
    out = sampler.sample(np.array([0, 1]), scores, rng)
    assert out["threshold"] == pytest.approx(tau)
    assert abs(tau - np.quantile(scores, 0.2)) < 0.1  # a probe of 50,000 draws: close to the 20th percentile
    assert out["easy"].shape == (2, 3) and out["hard"].shape == (2, 1)
    assert (scores[out["easy"][0]] > tau).all() and len(set(out["easy"][0])) == 3
    assert (scores[out["hard"][0]] < tau).all()
    assert set(out["easy"][1]) <= set(range(10, 14))
    # class 1 has no image below tau: the interval widens until one qualifies (all scores 0.8)
    assert out["hard"][1, 0] in range(10, 14)


def test_easy_hard_widening_order():
    # hard candidates: none below tau=0.3 in class 0 except after widening to (0, 0.35): image 2 (0.33)
    scores = np.array([0.9, 0.8, 0.33, 0.7])
    sampler = EasyHardSampler({0: np.arange(4)}, widen=0.05)
    picked = sampler.pick(scores, 0.0, 0.3, np.arange(4), 1, np.random.default_rng(0))
    assert picked.tolist() == [2]


def test_pk_sampler_batches_and_determinism(tmp_path):
    positions = {c: np.arange(c * 10, c * 10 + n) for c, n in enumerate([5, 2, 7, 1, 9, 4, 6, 3])}
    sampler = PKSampler(positions, p=2, k=4, seed=3, min_images=2, rank=0, world_size=1)
    assert sampler.skipped == [3]
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3  # 7 usable identities // 2
    seen = set()
    for batch in batches:
        assert len(batch) == 8
        ids = [i // 10 for i in batch]
        assert sorted(set(ids)) == sorted({ids[0], ids[4]}) and ids[:4] == [ids[0]] * 4 and ids[0] != ids[4]
        for i in batch:
            assert i in positions[i // 10]
        seen |= set(ids)
    assert 3 not in seen
    # identity 1 has 2 images < k: repeats; identity 2 has 7: distinct
    assert batches == list(PKSampler(positions, p=2, k=4, seed=3, min_images=2, rank=0, world_size=1))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [list(PKSampler(positions, 2, 4, seed=3, min_images=2, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 1
    assert ranks[0][0] == batches[0] and ranks[1][0] == batches[1]


def test_pk_sampler_on_image_folder_positions(tmp_path):
    for name, n in (("a", 3), ("b", 2), ("c", 4)):
        (tmp_path / name).mkdir()
        for i in range(n):
            (tmp_path / name / f"{i}.jpg").write_bytes(b"x")
    faces = ImageFolderFaces(tmp_path)
    sampler = PKSampler(faces.indices_per_identity(), p=3, k=2, seed=0, rank=0, world_size=1)
    (batch,) = list(sampler)
    assert sorted({int(faces.labels()[i]) for i in batch}) == [0, 1, 2]


def test_pk_sampler_bad_arguments():
    with pytest.raises(ValueError, match="p >= 2"):
        PKSampler({0: np.arange(3)}, p=1, k=2)
    with pytest.raises(ValueError, match="only 1 identities have >= 1 images; p is 2"):
        PKSampler({0: np.arange(3)}, p=2, k=2)


def test_top_negative_classes_skip_the_target():
    cos = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.6, -0.1]])
    out = top_negative_classes(cos, torch.tensor([0, 2]), k=2)
    assert out.tolist() == [[3, 2], [1, 0]]
    assert top_negative_classes(cos, torch.tensor([0, 2]), k=10).shape == (2, 3)
