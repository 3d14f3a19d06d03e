"""The memory budget: per-connection limit, fair share of the server's budget, and the one
exemption that lets a write that must be whole always finish."""

from __future__ import annotations

from nbdguard.server.budget import Holder, MemoryBudget

MiB = 1 << 20


class Client:
    """A holder and how many times it was told it may ask again."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.woken = 0
        self.holder: Holder = budget.open(self.wake)

    def wake(self) -> None:
        self.woken += 1


def test_a_connection_past_its_own_limit_is_throttled_until_it_drains() -> None:
    budget = MemoryBudget(total=100 * MiB, per_connection=8 * MiB)
    client = Client(budget)
    budget.update(client.holder, 8 * MiB)
    assert not budget.over(client.holder)  # at the limit is fine
    budget.update(client.holder, 8 * MiB + 1)
    assert budget.over(client.holder)
    budget.update(client.holder, 1 * MiB)
    assert client.woken == 1  # room was made: ask again
    assert not budget.over(client.holder)
    assert budget.unthrottled(client.holder) > 0
    assert budget.unthrottled(client.holder) == 0  # reported once


def test_a_connection_may_hold_what_the_others_leave_and_at_least_the_floor() -> None:
    budget = MemoryBudget(total=10 * MiB, per_connection=8 * MiB, max_connections=4)
    assert budget.floor == 10 * MiB // 4
    big, small = Client(budget), Client(budget)
    budget.update(big.holder, 7 * MiB)
    assert budget.allowance(small.holder) == 3 * MiB  # what big leaves
    assert budget.allowance(big.holder) == 8 * MiB  # its own limit: nobody else holds
    budget.update(big.holder, 8 * MiB)
    assert budget.allowance(small.holder) == budget.floor  # more than big leaves: the floor
    budget.update(small.holder, budget.floor)  # 10.5 MiB in all
    assert not budget.over(small.holder)
    assert budget.over(big.holder)  # past what small leaves it: big waits
    budget.update(big.holder, 6 * MiB)  # within the total again
    assert big.woken == 1 and not budget.over(big.holder)


def test_all_connections_together_stay_within_the_budget_plus_a_floor_each() -> None:
    """Twenty connections each filling what they are allowed, in turn (as their batches run
    on the loop): together they hold at most the budget plus one floor each."""
    budget = MemoryBudget(total=64 * MiB, per_connection=16 * MiB, max_connections=200)
    clients = [Client(budget) for _ in range(20)]
    for _ in range(3):
        for client in clients:
            budget.update(client.holder, budget.allowance(client.holder))
    assert budget.used <= 64 * MiB + 20 * budget.floor


def test_only_holders_within_bounds_are_woken_while_still_past_the_total() -> None:
    budget = MemoryBudget(total=10 * MiB, per_connection=10 * MiB, max_connections=10)
    first, second, third = Client(budget), Client(budget), Client(budget)
    for client in (first, second, third):
        budget.update(client.holder, 5 * MiB)
    assert budget.over(first.holder) and budget.over(second.holder)  # 15 MiB held
    budget.update(third.holder, 4 * MiB)  # 14 MiB: still past for both
    assert first.woken == second.woken == 0


def test_one_write_that_must_be_whole_may_go_past_the_budget_at_a_time() -> None:
    budget = MemoryBudget(total=10 * MiB, per_connection=4 * MiB)
    first, second = Client(budget), Client(budget)
    budget.update(first.holder, 6 * MiB)
    budget.update(second.holder, 6 * MiB)
    assert not budget.over(first.holder, gathering=True)  # exempt: it can finish
    assert budget.over(second.holder, gathering=True)  # the exemption is taken
    budget.update(first.holder, 0)  # its write is done and written
    assert second.woken >= 1
    assert not budget.over(first.holder)  # gives up the exemption...
    assert not budget.over(second.holder, gathering=True)  # ...which the other now takes


def test_a_closed_connection_gives_back_its_bytes_and_its_exemption() -> None:
    budget = MemoryBudget(total=10 * MiB, per_connection=4 * MiB)
    first, second = Client(budget), Client(budget)
    budget.update(first.holder, 6 * MiB)
    budget.update(second.holder, 6 * MiB)
    assert not budget.over(first.holder, gathering=True)
    assert budget.over(second.holder, gathering=True)
    budget.close(first.holder)
    assert budget.used == 6 * MiB and second.woken >= 1
    assert not budget.over(second.holder, gathering=True)
