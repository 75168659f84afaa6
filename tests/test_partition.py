"""core.partition: largest-remainder layer split (expected values worked out by hand in the comments)."""
from __future__ import annotations

import random

import pytest

from core.errors import UsageError
from core.partition import (format_layers, format_split, largest_remainder, parse_split,
                            split_layers)


def sizes(ranges: list[range]) -> list[int]:
    return [len(r) for r in ranges]


@pytest.mark.parametrize("n_layer, n_ranks, weights, expected", [
    (5, 1, None, [5]),
    (5, 2, [0.5, 0.5], [3, 2]),          # 2.5, 2.5 -> 2, 2; the spare layer goes to the lower rank
    (5, 2, [0.8, 0.2], [4, 1]),          # 4.0, 1.0 exactly
    (5, 3, [0.1, 0.3, 0.6], [1, 1, 3]),  # 0.5, 1.5, 3.0 -> 0, 1, 3; remainders .5 .5 0 -> rank 0
    (5, 4, None, [2, 1, 1, 1]),          # 1.25 each -> 1; the spare layer to rank 0
    (22, 2, None, [11, 11]),
    (22, 3, None, [8, 7, 7]),            # 7.33 each -> 7; the spare layer to rank 0
    (22, 2, [3, 1], [17, 5]),            # 16.5, 5.5 -> 16, 5; tie on .5 -> rank 0
    (7, 3, [0.2, 0.3, 0.5], [1, 2, 4]),  # 1.4, 2.1, 3.5 -> 1, 2, 3; largest remainder .5 -> rank 2
    (3, 3, [1, 1, 1], [1, 1, 1]),
    (10, 2, [9, 1], [9, 1]),
])
def test_split_sizes(n_layer, n_ranks, weights, expected):
    ranges = split_layers(n_layer, n_ranks, weights)
    assert sizes(ranges) == expected
    assert ranges[0].start == 0 and ranges[-1].stop == n_layer


def test_weights_need_not_sum_to_one():
    assert sizes(split_layers(6, 2, [2, 1])) == [4, 2]
    assert split_layers(6, 2, [2, 1]) == split_layers(6, 2, [0.6666666, 0.3333333])


def test_random_splits_cover_every_layer_once_and_stay_within_one_of_the_quota():
    rng = random.Random(1)
    for _ in range(500):
        n_ranks = rng.randint(1, 8)
        n_layer = rng.randint(n_ranks * 3, 100)
        weights = [rng.uniform(0.5, 2.0) for _ in range(n_ranks)]
        ranges = split_layers(n_layer, n_ranks, weights)
        layers = [i for r in ranges for i in r]
        assert layers == list(range(n_layer))                      # contiguous, in rank order, once each
        for share, w in zip(sizes(ranges), weights):
            assert abs(share - n_layer * w / sum(weights)) < 1.0   # largest remainder never misses by 1


def test_largest_remainder_hand_values():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(0, [1, 2]) == [0, 0]
    assert largest_remainder(100, [1, 0]) == [100, 0]
    assert sum(largest_remainder(1000, [0.1] * 7)) == 1000


def test_weight_count_must_match_world_size():
    with pytest.raises(UsageError, match=r"2 weights but the cluster has 3 ranks"):
        split_layers(5, 3, [0.5, 0.5])
    with pytest.raises(UsageError, match=r"1 weight but the cluster has 2 ranks"):
        split_layers(5, 2, [1.0])


def test_a_rank_without_layers_is_named():
    with pytest.raises(UsageError, match=r"^rank 3 would get no layer: an equal split of 3 layers over 4"):
        split_layers(3, 4)
    with pytest.raises(UsageError, match=r"^rank 1 would get no layer: --mpi-layer-split 1,0 of 5"):
        split_layers(5, 2, [1, 0])
    with pytest.raises(UsageError, match=r"^rank 0 would get no layer"):
        split_layers(5, 2, [0.05, 0.95])   # 0.25, 4.75 -> 0, 4; the spare layer goes to rank 1


@pytest.mark.parametrize("weights", [[-1, 2], [float("nan"), 1], [float("inf"), 1], [0, 0]])
def test_bad_weights(weights):
    with pytest.raises(UsageError, match="--mpi-layer-split"):
        split_layers(5, 2, weights)


def test_errors_are_one_line():
    with pytest.raises(UsageError) as info:
        split_layers(3, 4)
    assert "\n" not in str(info.value)


def test_parse_and_format():
    assert parse_split("0.8,0.2") == [0.8, 0.2]
    assert parse_split(" 1, 2 ,3") == [1.0, 2.0, 3.0]
    with pytest.raises(UsageError, match="item 2 'x'"):
        parse_split("1,x")
    assert format_split([0.8, 0.2]) == "0.8,0.2"
    assert format_layers(range(3, 7)) == "3-6"
    assert format_layers(range(4, 5)) == "4"
