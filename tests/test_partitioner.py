import doctest
import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nf_lightning.core.plan import partitioner
from nf_lightning.core.plan.partitioner import (
    Block,
    BudgetTooSmall,
    block_peak,
    group_units,
    max_batch_sizes,
    minimum_budget,
    partition,
)

MB = 10**6


@dataclass(frozen=True)
class LinearUnit:
    """A unit's memory model in whole bytes: peak = slope * batch + intercept."""

    slope: int
    intercept: int
    static_bytes: int = 0
    input_bytes_per_sample: int = 0

    def predict(self, batch: int) -> float:
        return float(self.slope * batch + self.intercept)

    def max_batch(self, budget_bytes: int) -> int:
        return max(0, (budget_bytes - self.intercept) // self.slope)


def mb_unit(slope: float, intercept: float, static: float = 0, input_per_sample: float = 0) -> LinearUnit:
    return LinearUnit(round(slope * MB), round(intercept * MB), round(static * MB), round(input_per_sample * MB))


@st.composite
def linear_units(draw) -> LinearUnit:
    static = draw(st.integers(0, 60 * MB))
    return LinearUnit(
        slope=draw(st.integers(1, 4 * MB)),
        intercept=static + draw(st.integers(0, 100 * MB)),
        static_bytes=static,
        input_bytes_per_sample=draw(st.integers(0, MB)),
    )


profiles = st.lists(linear_units(), min_size=1, max_size=8)
batch_limits = st.integers(1, 512)
rhos = st.sampled_from([0.0, 0.1, 0.4, 0.7, 1.5])
extra_budgets = st.integers(0, 2000 * MB)


def units_batch(blocks: list[Block]) -> list[int]:
    """The batch size each unit trains at."""
    return [block.batch_size for block in blocks for _ in block.units]


# --- Algorithm 1 grouping ------------------------------------------------------------------------


@given(st.lists(st.integers(1, 300), min_size=1, max_size=12), st.floats(0, 2))
def test_groups_are_maximal_runs_of_the_papers_neighbour_rule(sizes, rho):
    def similar(i):  # Algorithm 1, line 10: unit i+1 joins unit i's block
        return abs(sizes[i + 1] - sizes[i]) <= rho * sizes[i]

    groups = group_units(sizes, rho)
    assert [u for group in groups for u in group] == list(range(len(sizes)))
    for group in groups:
        assert all(similar(i) for i in group[:-1])
    for group in groups[:-1]:
        assert not similar(group[-1])


def test_grouping_compares_each_unit_with_its_left_neighbour():
    assert group_units([100, 70, 49], 0.4) == [[0, 1, 2]]  # drifts 51% below the first unit
    assert group_units([100, 141], 0.4) == [[0], [1]]  # 41 > 0.4 * 100
    assert group_units([141, 100], 0.4) == [[0, 1]]  # 41 <= 0.4 * 141
    assert group_units([100, 140], 0.4) == [[0, 1]]  # the bound is inclusive


def test_rho_zero_groups_runs_of_equal_sizes():
    assert group_units([8, 8, 16, 16, 16, 8], 0.0) == [[0, 1], [2, 3, 4], [5]]


def test_negative_rho_is_rejected():
    with pytest.raises(ValueError, match="rho"):
        group_units([1, 2], -0.1)


# --- block peak ----------------------------------------------------------------------------------


@given(linear_units(), st.integers(1, 1000))
def test_single_unit_block_peaks_at_its_prediction(unit, batch):
    assert block_peak([unit], [0], batch) == unit.predict(batch)


def test_block_peak_holds_statics_of_all_units_and_the_first_units_input():
    first = mb_unit(1, 30, static=10, input_per_sample=0.5)
    second = mb_unit(2, 20, static=5, input_per_sample=3)
    # statics 15 MB + max(first: 1*b + 20, second: 2*b + 15 + 0.5*b) at b=10
    assert block_peak([first, second], [0, 1], 10) == 15 * MB + 40 * MB
    assert block_peak([first, second], [1], 10) == second.predict(10)


# --- partition: properties -----------------------------------------------------------------------


@settings(deadline=None)
@given(profiles, extra_budgets, batch_limits, rhos)
def test_partition_covers_units_in_order_and_every_block_fits(models, extra, batch_limit, rho):
    budget = minimum_budget(models) + extra
    blocks = partition(models, budget, batch_limit, rho)
    sizes = max_batch_sizes(models, budget, batch_limit)

    assert [u for block in blocks for u in block.units] == list(range(len(models)))
    for block in blocks:
        peak = block_peak(models, block.units, block.batch_size)
        assert peak <= budget
        assert block.predicted_peak == math.ceil(peak)
        assert block.batch_size <= batch_limit
        assert block.batch_size <= min(models[u].max_batch(budget) for u in block.units)
        smallest = min(sizes[u] for u in block.units)
        assert smallest - block.batch_size <= rho * smallest  # shrunk by at most rho


@settings(deadline=None)
@given(profiles, extra_budgets, batch_limits, rhos)
def test_partition_refines_algorithm1_and_keeps_its_blocks_that_fit(models, extra, batch_limit, rho):
    budget = minimum_budget(models) + extra
    blocks = partition(models, budget, batch_limit, rho)
    sizes = max_batch_sizes(models, budget, batch_limit)

    for group in group_units(sizes, rho):
        inside = [block for block in blocks if block.units[0] in group]
        assert [u for block in inside for u in block.units] == group
        batch = min(sizes[u] for u in group)
        if block_peak(models, group, batch) <= budget:
            assert inside == [Block(tuple(group), batch, math.ceil(block_peak(models, group, batch)))]


@settings(deadline=None)
@given(profiles, extra_budgets, batch_limits)
def test_rho_zero_trains_every_unit_at_its_own_max_batch(models, extra, batch_limit):
    budget = minimum_budget(models) + extra
    blocks = partition(models, budget, batch_limit, rho=0.0)
    assert units_batch(blocks) == max_batch_sizes(models, budget, batch_limit)


@settings(deadline=None)
@given(profiles, extra_budgets, extra_budgets, batch_limits)
def test_rho_zero_batch_sizes_never_drop_when_the_budget_grows(models, extra, more, batch_limit):
    smaller = partition(models, minimum_budget(models) + extra, batch_limit, rho=0.0)
    larger = partition(models, minimum_budget(models) + extra + more, batch_limit, rho=0.0)
    assert all(b <= b2 for b, b2 in zip(units_batch(smaller), units_batch(larger)))


@given(profiles, st.floats(0, 2))
def test_budget_too_small_exactly_below_minimum_budget(models, fraction):
    minimum = minimum_budget(models)
    budget = max(1, round(fraction * minimum))
    if budget >= minimum:
        assert partition(models, budget)
        return
    with pytest.raises(BudgetTooSmall) as raised:
        partition(models, budget)
    assert raised.value.minimum_bytes == minimum
    assert math.ceil(models[raised.value.unit_index].predict(1)) == minimum


# --- partition: worked examples (sizes in MB, budget 300 MB) -----------------------------------

VGG_LIKE = [  # max batch at 300 MB = (300 - intercept) // slope, capped at 256
    mb_unit(4, 20),  # 70
    mb_unit(2.5, 25),  # 110
    mb_unit(1.6, 30),  # 168
    mb_unit(1.2, 40),  # 216
    mb_unit(0.6, 60),  # 400 -> 256
    mb_unit(0.4, 80),  # 550 -> 256
    mb_unit(0.2, 90),  # 1050 -> 256
    mb_unit(0.1, 50),  # 2500 -> 256
]


def test_vgg_like_profile_follows_algorithm1_by_hand():
    sizes = max_batch_sizes(VGG_LIKE, 300 * MB, 256)
    assert sizes == [70, 110, 168, 216, 256, 256, 256, 256]
    # 110-70 = 40 > 28; 168-110 = 58 > 44; 216-168 = 48 <= 67.2; 256-216 = 40 <= 86.4.
    # 256 is 52% above 168, but the chain through 216 keeps them together.
    blocks = partition(VGG_LIKE, 300 * MB, 256, 0.4)
    assert [(b.units, b.batch_size) for b in blocks] == [((0,), 70), ((1,), 110), ((2, 3, 4, 5, 6, 7), 168)]


def test_rho_zero_gives_one_block_per_run_of_equal_batch_sizes():
    blocks = partition(VGG_LIKE, 300 * MB, 256, 0.0)
    assert [(b.units, b.batch_size) for b in blocks] == [
        ((0,), 70), ((1,), 110), ((2,), 168), ((3,), 216), ((4, 5, 6, 7), 256)
    ]


def test_huge_budget_gives_one_block_at_the_batch_limit():
    blocks = partition(VGG_LIKE, 10**15, batch_limit=128)
    assert [(b.units, b.batch_size) for b in blocks] == [(tuple(range(8)), 128)]


def test_block_that_does_not_fit_is_shrunk_within_rho():
    # Each alone fits at 100; together: 20 + 190 + b <= 300 -> b = 90, 10% below 100.
    twins = [mb_unit(1, 200, static=10)] * 2
    assert partition(twins, 300 * MB, 256, 0.4) == [Block((0, 1), 90, 300 * MB)]


def test_held_input_counts_and_a_shrink_of_exactly_rho_is_accepted():
    # 20 + max(b + 190, b + 190 + 0.5 b) <= 300 -> b = 60, exactly 40% below 100.
    pair = [mb_unit(1, 200, static=10, input_per_sample=0.5), mb_unit(1, 200, static=10)]
    assert partition(pair, 300 * MB, 256, 0.4) == [Block((0, 1), 60, 300 * MB)]


def test_block_that_would_shrink_by_more_than_rho_is_split():
    # Together: 100 + 150 + b <= 300 -> b = 50, 50% below 100: split, each alone at 100.
    twins = [mb_unit(1, 200, static=50)] * 2
    blocks = partition(twins, 300 * MB, 256, 0.4)
    assert [(b.units, b.batch_size) for b in blocks] == [((0,), 100), ((1,), 100)]


def test_split_point_maximises_the_smaller_parts_batch():
    # Four units with 30 MB static each fit together only at b=10. Cuts: 1|3 -> min(100, 40),
    # 2|2 -> min(70, 70), 3|1 -> min(40, 100). 2|2 wins and 70 is within 40% of 100.
    quads = [mb_unit(1, 200, static=30)] * 4
    blocks = partition(quads, 300 * MB, 256, 0.4)
    assert [(b.units, b.batch_size) for b in blocks] == [((0, 1), 70), ((2, 3), 70)]


def test_algorithm1_can_lower_a_units_batch_when_the_budget_grows():
    # The paper's grouping is not monotone in the budget, and neither is partition:
    # at 11 MB the sizes [10, 20] are apart (10 > 0.4 * 10); at 16 MB [15, 20] group at 15.
    models = [mb_unit(1, 1), mb_unit(0.1, 1)]
    assert units_batch(partition(models, 11 * MB, batch_limit=20)) == [10, 20]
    assert units_batch(partition(models, 16 * MB, batch_limit=20)) == [15, 15]


def test_budget_too_small_names_the_minimum_and_the_unit():
    models = [mb_unit(1, 5), mb_unit(1, 10), mb_unit(3.4, 20), mb_unit(1, 2)]
    with pytest.raises(BudgetTooSmall) as raised:
        partition(models, 1 * MB)
    assert isinstance(raised.value, ValueError)
    assert (raised.value.minimum_bytes, raised.value.unit_index) == (23_400_000, 2)
    assert str(raised.value) == (
        "budget 1.0 MB is below the smallest feasible budget 23.4 MB, needed by unit 2 (batch 1)"
    )


@settings(deadline=None)
@given(profiles, extra_budgets, batch_limits, rhos, st.data())
def test_no_block_runs_below_the_smallest_batch_of_its_units(models, extra, batch_limit, rho, data):
    smallest = data.draw(st.lists(st.integers(1, 2), min_size=len(models), max_size=len(models)))
    if batch_limit < max(smallest):
        with pytest.raises(ValueError, match="smallest batch"):
            partition(models, 10**12, batch_limit, rho, smallest)
        return
    budget = minimum_budget(models, smallest) + extra
    assert budget - extra == max(math.ceil(m.predict(s)) for m, s in zip(models, smallest))
    blocks = partition(models, budget, batch_limit, rho, smallest)
    assert [u for block in blocks for u in block.units] == list(range(len(models)))
    for block in blocks:
        assert block.batch_size >= max(smallest[u] for u in block.units)
        assert block_peak(models, block.units, block.batch_size) <= budget


def test_a_unit_with_batchnorm_at_the_minimum_budget_gets_batch_2_not_1():
    models = [mb_unit(1, 5), mb_unit(2, 10), mb_unit(1, 2)]  # unit 1 needs 12 MB at batch 1, 14 MB at 2
    assert [b.batch_size for b in partition(models, 12 * MB, rho=0)][1] == 1  # without a floor
    with pytest.raises(BudgetTooSmall, match=r"14.0 MB, needed by unit 1 \(batch 2\)"):
        partition(models, 12 * MB, rho=0, smallest=[2, 2, 2])
    assert [b.batch_size for b in partition(models, 14 * MB, rho=0, smallest=[2, 2, 2])] == [9, 2, 12]


@pytest.mark.parametrize(
    ("models", "batch_limit", "smallest"),
    [([], 256, None), ([mb_unit(1, 1)], 0, None), ([mb_unit(1, 1)], 8, [0]), ([mb_unit(1, 1)], 8, [1, 1])],
)
def test_partition_rejects_bad_arguments(models, batch_limit, smallest):
    with pytest.raises(ValueError):
        partition(models, 300 * MB, batch_limit, smallest=smallest)


# --- Block ---------------------------------------------------------------------------------------


def test_block_round_trips_through_a_dict():
    block = Block((3, 4, 5), 128, 299 * MB)
    assert block.to_dict() == {"units": [3, 4, 5], "batch_size": 128, "predicted_peak": 299 * MB}
    assert Block.from_dict(block.to_dict()) == block


@pytest.mark.parametrize(("units", "batch_size"), [((), 1), ((0, 2), 1), ((1, 0), 1), ((0,), 0)])
def test_block_rejects_invalid_fields(units, batch_size):
    with pytest.raises(ValueError):
        Block(units, batch_size, 0)


def test_docstring_examples():
    assert doctest.testmod(partitioner).failed == 0
