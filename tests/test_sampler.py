"""The training order: global batches independent of the process count, mid-epoch resume, keyed
augmentation."""

from __future__ import annotations

import pytest
import torch

from core.config import AugmentConfig, ConfigError
from data.sampler import GlobalBatchSampler, KeyedFaceDataset
from data.transforms import FaceDataset, FaceTransform
from tests.synthetic_faces import write_identity_folder


def test_two_ranks_see_what_one_rank_sees_with_accumulation():
    one = list(GlobalBatchSampler(100, 8, world_size=1, rank=0, grad_accum=2, seed=3))
    ranks = [list(GlobalBatchSampler(100, 8, world_size=2, rank=r, grad_accum=1, seed=3)) for r in range(2)]
    assert len(one) == 2 * 6 and all(len(r) == 6 for r in ranks)  # 100 // 16 = 6 steps, 4 images dropped
    for step in range(6):
        assert one[2 * step] == ranks[0][step] and one[2 * step + 1] == ranks[1][step]
    seen = [i for batch in one for _, i in batch]
    assert len(set(seen)) == 96  # no image twice in an epoch


def test_mid_epoch_start_yields_the_rest_of_the_epoch():
    sampler = GlobalBatchSampler(50, 5, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_step=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    assert all(epoch == 2 for batch in full for epoch, _ in batch)
    sampler.set_epoch(3)
    assert list(sampler) != full  # a new permutation each epoch
    again = GlobalBatchSampler(50, 5, seed=1)
    again.set_epoch(2)
    assert list(again) == full  # and the same one for the same seed and epoch
    with pytest.raises(ValueError, match=r"start step 11 outside \[0, 10\]"):
        sampler.set_epoch(0, start_step=11)


def test_a_global_batch_larger_than_the_data_is_refused():
    with pytest.raises(ConfigError, match=r"global batch of 64 images .* larger than the dataset.s 40"):
        GlobalBatchSampler(40, 16, world_size=2, rank=1, grad_accum=2)


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    from data.image_folder import ImageFolderFaces

    write_identity_folder(tmp_path, identities=2, per_identity=3, size=32)
    cfg = AugmentConfig(flip=0.5, crop=0.5, low_res=0.5, photometric=0.5)
    keyed = KeyedFaceDataset(
        FaceDataset(ImageFolderFaces(tmp_path), FaceTransform(cfg, image_size=32)), seed=7
    )
    image, label, index = keyed[(0, 4)]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and index == 4 and label.item() == 1
    torch.testing.assert_close(keyed[(0, 4)][0], image)  # same key, same pixels, whoever reads it
    other_epochs = [keyed[(e, 4)][0] for e in range(1, 6)]
    assert any(not torch.equal(x, image) for x in other_epochs)
    reseeded = KeyedFaceDataset(keyed, seed=8)
    assert any(not torch.equal(reseeded[(e, 4)][0], keyed[(e, 4)][0]) for e in range(6))
