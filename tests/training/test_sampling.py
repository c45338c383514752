import torch

from trustseg.training.sampling import EpochBatches, epoch_permutation, step_seed


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
