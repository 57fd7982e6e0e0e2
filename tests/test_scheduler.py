"""Scheduler decisions and the swap policy, with in-memory processes (no sockets, no children).

The end-to-end tests in test_lifecycle.py check the same rules against real upstreams; these
pin the exact order of starts, stops and grants, which timing makes hard to see from outside.

Every test here runs in synchronous steps: a request is a `Client` task that holds its lease
until the test releases it, `settle()` lets the event loop run whatever is ready (no real time
passes), and time exists only as a `FakeClock` the test advances. A swap the scheduler holds back
for a while is re-checked by a real-time timer in production; here the test advances the clock
past the hold and calls `pump()`, which is all that timer does.
"""

from __future__ import annotations

import asyncio

import pytest

from helpers import Client, FakeClock, make_scheduler, one_at_a_time, settle
from llama_swap import READY, STARTING, Group, GroupPolicy, HttpCall, SchedulerError, Sleep


class Bench:
    """A scheduler on virtual time over in-memory processes. `events` records their starts and
    stops, `served` the model of each granted request in the order of the grants."""

    def __init__(self, *names: str, **settings):
        self.clock = FakeClock()
        self.scheduler, self.processes, self.events = make_scheduler(*names, clock=self.clock, **settings)
        self.served: list[str] = []

    def client(self, model: str, *, recorded: bool = True) -> Client:
        """A request for `model`, arriving now; its grant goes into `served` unless not `recorded`."""
        return Client(self.scheduler, model, self.served if recorded else None)

    async def later(self, seconds: float) -> None:
        """`seconds` of virtual time pass; then the scheduler re-reads its queue, as the timer of
        a held swap makes it do, and the loop settles."""
        self.clock.advance(seconds)
        self.scheduler.pump()
        await settle()

    def queued(self) -> list[str]:
        return [t.model for t in self.scheduler.queue]

    def wake_due_within(self, seconds: float) -> bool:
        """Whether the scheduler has its own re-check scheduled, at most `seconds` from now (real
        time, as the timer runs on the loop's clock): a held swap then goes ahead without a new request."""
        wake = self.scheduler.wake
        return wake is not None and wake.when() - asyncio.get_running_loop().time() <= seconds


async def release_all(clients: list[Client]) -> None:
    for c in clients:
        c.release()
    await settle()
    assert all(c.done for c in clients)


async def test_requests_queued_while_cold_are_collated_by_model():
    bench = Bench("a", "b")
    bench.processes["a"].start_gate.clear()  # a is cold: its start runs while the others arrive
    a1 = bench.client("a")
    await settle()
    b1 = bench.client("b")
    await settle()
    a2 = bench.client("a")
    await settle()
    b2 = bench.client("b")
    await settle()
    assert bench.events == ["start a"] and bench.processes["a"].state == STARTING
    assert bench.queued() == ["b", "b"], "the second a joins the start under way"
    bench.processes["a"].start_gate.set()
    await settle()
    assert bench.served == ["a", "a"] and a1.granted and a2.granted
    a1.release()
    await settle()
    assert not b1.granted, "the second a is still serving"
    a2.release()
    await settle()
    assert bench.served == ["a", "a", "b", "b"]
    assert bench.events == ["start a", "stop a", "start b"]
    await release_all([b1, b2])


async def test_concurrent_requests_for_a_cold_model_share_one_start():
    bench = Bench("a")
    bench.processes["a"].start_gate.clear()
    clients = [bench.client("a") for _ in range(20)]
    await settle()
    assert bench.events == ["start a"] and not any(c.granted for c in clients)
    bench.processes["a"].start_gate.set()
    await settle()
    assert all(c.granted for c in clients)
    assert bench.served == ["a"] * 20
    assert bench.events == ["start a"]
    await release_all(clients)


async def test_a_swap_never_stops_a_model_that_is_still_serving():
    bench = Bench("a", "b")
    long_a = bench.client("a")
    await settle()
    assert long_a.granted
    b = bench.client("b")
    await settle()
    assert bench.events == ["start a"] and bench.processes["a"].state == READY
    assert not b.granted and bench.queued() == ["b"]
    long_a.release()
    await settle()
    assert b.granted
    assert bench.served == ["a", "b"]
    assert bench.events == ["start a", "stop a", "start b"]
    await release_all([b])


async def test_requests_for_the_ready_model_go_straight_through_while_others_wait():
    bench = Bench("a", "b")
    long_a = bench.client("a")
    await settle()
    b = bench.client("b")
    await settle()
    a = bench.client("a")
    await settle()
    assert a.granted and not b.granted
    assert bench.served == ["a", "a"]
    a.release()
    await settle()
    assert a.done and not b.granted, "the first a is still serving"
    long_a.release()
    await settle()
    assert bench.served == ["a", "a", "b"]
    await release_all([b])


async def test_failed_start_answers_every_waiter_and_the_next_request_tries_again():
    bench = Bench("a")
    bench.processes["a"].fail_next_start = "upstream command exited prematurely"
    clients = [bench.client("a") for _ in range(3)]
    await settle()
    assert all(c.done and not c.granted for c in clients)
    assert all(isinstance(c.error, SchedulerError) and "exited prematurely" in str(c.error) for c in clients)
    again = bench.client("a")
    await settle()
    assert again.granted and again.error is None
    assert bench.served == ["a"] and bench.events == ["start a", "start a"]
    await release_all([again])


async def test_a_client_that_leaves_the_queue_never_starts_its_model():
    bench = Bench("a", "b")
    long_a = bench.client("a")
    await settle()
    b = bench.client("b")
    await settle()
    assert bench.queued() == ["b"]
    b.leave()
    await settle()
    assert b.task.cancelled()
    long_a.release()
    await settle()
    assert long_a.done
    assert bench.events == ["start a"]
    assert bench.scheduler.queue == [] and bench.scheduler.in_flight["a"] == 0


async def test_a_grant_to_a_client_that_already_left_is_given_back():
    bench = Bench("a")
    scheduler = bench.scheduler
    waiter = bench.client("a")
    grant = scheduler._grant

    def grant_as_the_client_leaves(ticket):
        grant(ticket)
        waiter.leave()

    scheduler._grant = grant_as_the_client_leaves
    await settle()
    with pytest.raises(asyncio.CancelledError):
        await waiter.task
    assert not waiter.granted
    assert scheduler.in_flight["a"] == 0 and not scheduler.swaps


async def test_unload_tells_waiting_requests_and_stops_the_model():
    bench = Bench("a")
    bench.processes["a"].start_gate.clear()
    waiter = bench.client("a")
    await settle()
    assert bench.processes["a"].state == STARTING
    await bench.scheduler.unload(["a"])
    await settle()
    assert waiter.done and not waiter.granted
    assert isinstance(waiter.error, SchedulerError) and "group: model unloaded" in str(waiter.error)
    assert bench.events == ["start a", "stop a"]
    bench.processes["a"].start_gate.set()
    await settle()


async def test_closed_scheduler_refuses_new_and_waiting_requests():
    bench = Bench("a")
    bench.processes["a"].start_gate.clear()
    waiter = bench.client("a")
    await settle()
    bench.scheduler.close()
    await settle()
    assert waiter.done and not waiter.granted
    assert isinstance(waiter.error, SchedulerError) and "group is shutting down" in str(waiter.error)
    late = bench.client("a")
    await settle()
    assert late.done and not late.granted
    assert isinstance(late.error, SchedulerError) and "group is shutting down" in str(late.error)
    bench.processes["a"].start_gate.set()
    await settle()


def test_default_group_runs_one_model_at_a_time():
    policy = one_at_a_time(["a", "b", "c"])
    assert policy.evictions("a", {"b", "c"}) == {"b", "c"}
    assert policy.evictions("a", {"a"}) == set()


def test_group_rules_for_swap_exclusive_and_persistent():
    policy = GroupPolicy([
        Group("llm", frozenset({"l1", "l2"})),
        Group("side", frozenset({"e1", "e2"}), swap=False, exclusive=False),
        Group("pinned", frozenset({"p"}), persistent=True),
    ])
    assert policy.evictions("l1", {"l2", "e1", "p"}) == {"l2", "e1"}  # persistent groups stay
    assert policy.evictions("e1", {"e2", "l1", "p"}) == set()  # non-exclusive, no swap: nothing stops
    assert policy.evictions("p", {"l1", "e1"}) == {"l1", "e1"}


# -- against thrashing: holds for models in steady use, a bound on every wait ---------------------


async def steady_use(bench: Bench, model: str, load_time: float = 5.0, gap: float = 2.0) -> None:
    """`model` loaded (as if that took `load_time` seconds) and asked for three times, `gap`
    seconds apart, each request served and finished at once: its usual gap is then `gap`, and
    the clock stands at its last use."""
    bench.processes[model].load_times = [load_time]
    for turn in range(3):
        if turn:
            bench.clock.advance(gap)
        request = bench.client(model, recorded=False)
        await settle()
        assert request.granted
        await release_all([request])


async def test_a_swap_waits_while_the_loaded_model_is_in_steady_use_and_it_keeps_serving():
    bench = Bench("a", "b")
    await steady_use(bench, "a")  # usual gap 2 s, shorter than the 5 s a reload takes
    b = bench.client("b")
    await settle()
    assert not b.granted and bench.events == ["start a"], "a is in steady use: no swap yet"
    a = bench.client("a")  # the agent's next call to a: no swap in between
    await settle()
    assert a.granted and not b.granted
    await release_all([a])
    assert bench.wake_due_within(2.0), "the hold ends by itself, without another request"
    await bench.later(1.0)
    assert not b.granted, "a was used just now: its usual gap has not passed"
    await bench.later(1.0)
    assert b.granted
    assert bench.served == ["a", "b"]
    assert bench.events == ["start a", "stop a", "start b"]
    await release_all([b])


def can_sleep(bench: Bench, model: str) -> None:
    bench.processes[model].model.sleep = Sleep(HttpCall("POST", "/sleep"), HttpCall("POST", "/wake_up"))


async def test_a_model_that_sleeps_is_held_by_its_wake_time_not_its_load_time():
    bench = Bench("a", "b")
    can_sleep(bench, "a")
    bench.processes["a"].wake_times = [0.5]  # getting a back costs 0.5 s, less than its usual gap
    await steady_use(bench, "a", load_time=5.0, gap=2.0)
    b = bench.client("b")
    await settle()
    assert b.granted, "a wakes faster than it is asked for again: no reason to hold b"
    assert bench.events == ["start a", "sleep a", "start b"]
    await release_all([b])


async def test_a_model_that_sleeps_but_never_woke_is_weighed_by_its_load_time():
    bench = Bench("a", "b")
    can_sleep(bench, "a")
    await steady_use(bench, "a", load_time=5.0, gap=2.0)
    b = bench.client("b")
    await settle()
    assert not b.granted and bench.events == ["start a"], "no wake seen yet: a reload is what it may cost"
    await bench.later(2.0)
    assert b.granted and bench.events == ["start a", "sleep a", "start b"]
    await release_all([b])


async def test_sleeping_models_are_left_alone_by_group_swaps_and_woken_on_request():
    bench = Bench("a", "b", "c")
    for model in ("a", "b"):
        can_sleep(bench, model)
    for model in ("a", "b", "c", "a"):
        request = bench.client(model)
        await settle()
        assert request.granted, model
        await release_all([request])
    assert bench.events == ["start a", "sleep a", "start b", "sleep b", "start c", "stop c", "wake a"]
    assert bench.scheduler.asleep() == ["b"] and bench.scheduler.running() == ["a"]


async def test_a_model_used_once_is_swapped_out_at_once():
    bench = Bench("a", "b")
    bench.processes["a"].load_times = [5.0]
    a = bench.client("a")
    await settle()
    await release_all([a])
    b = bench.client("b")
    await settle()
    assert b.granted_at == a.granted_at, "no usual gap known: nothing to wait for"
    assert bench.scheduler.wake is None
    assert bench.events == ["start a", "stop a", "start b"]
    await release_all([b])


async def test_a_hold_ends_after_the_usual_gap_without_a_new_request():
    bench = Bench("a", "b")
    await steady_use(bench, "a", gap=2.0)
    arrived = bench.clock()
    b = bench.client("b")
    await settle()
    assert not b.granted and bench.events == ["start a"]
    assert bench.wake_due_within(2.0), "the scheduler re-checks by itself when the hold ends"
    await bench.later(1.5)
    assert not b.granted
    await bench.later(0.5)  # the re-check after the hold ends it
    assert b.granted and b.granted_at - arrived == 2.0
    assert bench.events[-2:] == ["stop a", "start b"]
    await release_all([b])


async def test_a_request_queued_max_wait_stops_the_ready_model_from_taking_new_ones():
    bench = Bench("a", "b", max_wait=2.0)
    long_a = bench.client("a", recorded=False)
    await settle()
    b = bench.client("b")
    await settle()
    assert bench.queued() == ["b"]
    bench.clock.advance(1.0)
    a = bench.client("a")  # b has waited less than max_wait: a still takes this one
    await settle()
    assert a.granted and bench.served == ["a"]
    await release_all([a])
    bench.clock.advance(2.0)
    late_a = bench.client("a")  # b is overdue now: this one queues
    await settle()
    assert not late_a.granted and bench.queued() == ["b", "a"]
    long_a.release()
    await settle()
    assert b.granted and not late_a.granted
    b.release()
    await settle()
    assert late_a.granted
    assert bench.served == ["a", "b", "a"]
    assert bench.events == ["start a", "stop a", "start b", "stop b", "start a"]
    await release_all([long_a, b, late_a])


async def test_max_wait_zero_is_strict_arrival_order():
    bench = Bench("a", "b", max_wait=0)
    bench.processes["a"].start_gate.clear()  # a is cold: its start runs while the others arrive
    clients = []
    for model in "abab":
        clients.append(bench.client(model))
        await settle()
    assert bench.queued() == ["b", "a", "b"], "nothing joins a start past a request that waits"
    bench.processes["a"].start_gate.set()
    await settle()
    for expected, request in zip("abab", clients):
        assert request.granted and bench.served[-1] == expected
        await release_all([request])
    assert bench.served == ["a", "b", "a", "b"]
    assert bench.events.count("start a") == 2 and bench.events.count("start b") == 2


async def test_min_residency_keeps_a_model_just_loaded_within_max_wait():
    bench = Bench("a", "b", min_residency=3.0, max_wait=50)
    a = bench.client("a")
    await settle()
    loaded = bench.processes["a"].ready_since
    await release_all([a])
    b = bench.client("b")
    await settle()
    assert not b.granted and bench.wake_due_within(3.0)
    await bench.later(2.5)
    assert not b.granted, "a was loaded less than min_residency ago"
    await bench.later(0.5)
    assert b.granted and b.granted_at - loaded == 3.0
    await release_all([b])

    bench = Bench("a", "b", min_residency=50, max_wait=2.0)
    a = bench.client("a")
    await settle()
    await release_all([a])
    b = bench.client("b")
    await settle()
    arrived = bench.clock()
    assert not b.granted
    await bench.later(2.0)  # max_wait bounds the residency
    assert b.granted and b.granted_at - arrived == 2.0
    await release_all([b])


async def test_a_model_asked_for_less_often_than_it_takes_to_load_is_swapped_out_at_once():
    bench = Bench("a", "b")
    await steady_use(bench, "a", load_time=1.0, gap=2.0)  # a reload costs less than its gap
    b = bench.client("b")
    await settle()
    assert b.granted and b.granted_at == bench.clock(), "granted with no time passing"
    assert bench.scheduler.wake is None
    assert bench.events == ["start a", "stop a", "start b"]
    await release_all([b])


async def test_a_request_held_back_by_an_overdue_one_goes_on_when_that_one_leaves():
    bench = Bench("a", "b", max_wait=1.0)
    long_a = bench.client("a", recorded=False)
    await settle()
    overdue_b = bench.client("b")
    await settle()
    bench.clock.advance(2.0)
    held_a = bench.client("a")  # queued behind the overdue b
    await settle()
    assert bench.served == [] and bench.queued() == ["b", "a"]
    overdue_b.leave()  # its client leaves
    await settle()
    assert held_a.granted, "at once, not when the long request ends"
    assert not long_a.done
    await release_all([held_a, long_a])
    assert bench.events == ["start a"]
