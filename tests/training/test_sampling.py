import pytest
import torch

from trustseg.data.combined import Mixture
from trustseg.training.sampling import (EpochBatches, MultiScaleBatches, epoch_order, epoch_permutation, quotas,
                                       scaled_shape, step_seed)


def batches(length, batch, first_step, rank=0, world=1, seed=5):
    return list(EpochBatches(length, batch, seed=seed, first_step=first_step, rank=rank, world_size=world))


def test_each_epoch_is_a_seeded_permutation_with_the_tail_dropped():
    epoch0 = batches(10, 3, first_step=0)
    assert len(epoch0) == 3 and all(len(b) == 3 for b in epoch0)
    assert sorted(sum(epoch0, [])) == sorted(epoch_permutation(10, 5, 0)[:9].tolist())
    assert len(set(sum(epoch0, []))) == 9
    assert batches(10, 3, first_step=3) != epoch0  # epoch 1 is shuffled anew
    assert batches(10, 3, first_step=3) == batches(10, 3, first_step=3)
    assert batches(10, 3, first_step=0, seed=6) != epoch0


def test_resuming_mid_epoch_continues_the_same_order():
    whole = batches(20, 4, first_step=5)  # epoch 1, all 5 steps
    assert batches(20, 4, first_step=7) == whole[2:]


def test_processes_split_each_global_batch():
    single = batches(16, 4, first_step=0)
    shares = [batches(16, 4, first_step=0, rank=r, world=2) for r in range(2)]
    for step, batch in enumerate(single):
        assert sorted(shares[0][step] + shares[1][step]) == sorted(batch)
        assert not set(shares[0][step]) & set(shares[1][step])


def test_step_seeds_differ_by_step_and_rank():
    seeds = {step_seed(0, step, rank) for step in range(50) for rank in range(2)}
    assert len(seeds) == 100
    assert step_seed(0, 3, 1) == step_seed(0, 3, 1)
    assert torch.equal(epoch_permutation(7, 1, 2), epoch_permutation(7, 1, 2))


# --- combined train sets with sampling weights ------------------------------------------------------

MIXTURE = Mixture(lengths=(30, 6), ratio=(1.0, 1.0))  # a large part and a small one, drawn alike


def mixed_batches(first_step, rank=0, world=1, seed=5, mixture=MIXTURE, batch=4):
    return list(EpochBatches(sum(mixture.lengths), batch, seed=seed, first_step=first_step, rank=rank,
                             world_size=world, mixture=mixture))


def part_of(index, mixture=MIXTURE):
    return int(index >= mixture.lengths[0])


@pytest.mark.parametrize("total, ratio, expected", [
    (36, (1, 1), [18, 18]), (10, (3, 1), [8, 2]), (10, (1, 1, 1), [4, 3, 3]), (7, (0.5, 0.25, 0.25), [3, 2, 2]),
])
def test_quotas_are_proportional_and_sum_to_the_epoch(total, ratio, expected):
    assert quotas(total, ratio) == expected


@pytest.mark.parametrize("ratio", [(1.0, 1.0), (3.0, 1.0), (1.0, 5.0)])
def test_every_epoch_draws_the_parts_in_the_ratio(ratio):
    mixture = Mixture((30, 6), ratio)
    share = ratio[1] / sum(ratio)
    for epoch in range(4):
        order = (epoch_order(36, 5, epoch, mixture) % 36).tolist()
        assert len(order) == 36
        assert sum(part_of(i) for i in order) == round(36 * share)  # exact quota per epoch, not just on average
        # the parts are shuffled together, not laid out in blocks
        positions = [p for p, i in enumerate(order) if part_of(i)]
        assert positions[-1] - positions[0] + 1 > len(positions)


def test_oversampled_part_repeats_each_sample_equally_often_across_epochs():
    # 18 draws per epoch from 6 samples: each sample 3x per epoch; 18 from 30: each sample once per 5/3 epochs
    counts = torch.zeros(36, dtype=torch.long)
    for epoch in range(5):
        order = epoch_order(36, 5, epoch, MIXTURE)
        assert len(set(order.tolist())) == 36  # a repeat within the epoch comes as index + r * 36
        counts += torch.bincount(order % 36, minlength=36)
    assert counts[30:].tolist() == [15] * 6  # 5 epochs x 18 draws over 6 samples
    assert counts[:30].tolist() == [3] * 30  # 5 epochs x 18 = 90 draws = 3 full passes over 30 samples


def test_mixture_order_is_deterministic_and_resumes_mid_epoch():
    whole = mixed_batches(first_step=9)  # epoch 1 (9 steps of 4)
    assert whole == mixed_batches(first_step=9)
    assert mixed_batches(first_step=13) == whole[4:]
    assert mixed_batches(first_step=9, seed=6) != whole
    assert mixed_batches(first_step=0) != whole


def test_processes_split_each_mixed_global_batch():
    single = mixed_batches(first_step=0)
    shares = [mixed_batches(first_step=0, rank=r, world=2) for r in range(2)]
    for step, batch in enumerate(single):
        assert sorted(shares[0][step] + shares[1][step]) == sorted(batch)


def multiscale(first_step=0, rank=0, world_size=1, length=40):
    return MultiScaleBatches(length, 8, crop=(64, 96), scales=(0.5, 1.0, 1.5), divisor=16, seed=5,
                             first_step=first_step, rank=rank, world_size=world_size)


def test_scaled_shapes_keep_about_the_pixels_of_a_batch():
    base = 8 * 64 * 96
    for factor, (batch, crop) in {0.5: (32, (32, 48)), 1.0: (8, (64, 96)), 1.5: (4, (96, 144))}.items():
        assert scaled_shape(factor, batch_size=8, crop=(64, 96), divisor=16) == (batch, crop)
        assert abs(batch * crop[0] * crop[1] - base) / base < 0.2
    # crops stay multiples of the stride; batches multiples of the processes
    assert scaled_shape(0.8, batch_size=8, crop=(64, 96), divisor=16, world_size=4) == (12, (48, 80))


def steps_of(first_step: int, count: int) -> list[list[tuple[int, int, int]]]:
    """The batches of steps first_step .. first_step + count, walking epoch after epoch."""
    batches = []
    while len(batches) < count:
        sampler = multiscale(first_step + len(batches))
        batches += list(sampler)
    return batches[:count]


def test_multiscale_steps_vary_in_crop_cover_each_epoch_once_and_resume_anywhere():
    whole = steps_of(0, 30)
    crops = [batch[0][1:] for batch in whole]
    assert {(32, 48), (64, 96), (96, 144)} == set(crops)
    for batch, crop in zip(whole, crops):
        assert all(item[1:] == crop for item in batch)  # one crop per step
        assert len(batch) == {(32, 48): 32, (64, 96): 8, (96, 144): 4}[crop]
    first = multiscale(0)
    epoch_zero = [index for batch in first for index, _, _ in batch]
    assert len(epoch_zero) == len(set(epoch_zero)) and len(epoch_zero) > 40 - 32  # no repeats, tail < one batch
    for start in (1, 5, 13, 29):  # a run resumed at any step sees the same batches
        assert steps_of(start, 30 - start) == whole[start:]


def test_multiscale_processes_split_each_global_batch():
    single = list(multiscale(0, length=64))  # every batch size here is even: the same global batches
    shares = [list(multiscale(0, rank=r, world_size=2, length=64)) for r in range(2)]
    assert len(single) == len(shares[0]) == len(shares[1]) >= 2
    for batch, first, second in zip(single, *shares):
        assert sorted(first + second) == sorted(batch) and first == batch[0::2]


def test_a_batch_larger_than_the_train_set_is_refused():
    with pytest.raises(ValueError, match="smaller than one batch of 32"):
        multiscale(0, length=20)
