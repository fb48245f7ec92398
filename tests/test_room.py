"""Waiting for room, without Ray running: the limits a run's worker-group starts get (RoomWatch, driven
through Ray Train's own controller states), and the slots that cap the trials training at once (TrialSlots).

The Ray tests of the same behaviour: tests/test_oversubscribed.py.
"""

from __future__ import annotations

import pickle
import time
from types import SimpleNamespace

import pytest
from ray.train import ControllerError
from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.controller import state as states
from ray.train.v2._internal.execution.scaling_policy import ResizeDecision

from alignprop_ray.sweep import slots as slots_module
from alignprop_ray.sweep.slots import LEASE_S, TrialSlots
from alignprop_ray.train import placement
from alignprop_ray.train.placement import NoRoomError, RoomWatch, StartFailedError

HOUR = 3600.0
SCHEDULING = states.SchedulingState(ResizeDecision(num_workers=2, resources_per_worker={"CPU": 2}))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(placement.time, "monotonic", clock)
    monkeypatch.setattr(slots_module.time, "monotonic", clock)
    return clock


def watch(**limits) -> RoomWatch:
    settings = {"wait_for_room_s": None, "wait_for_workers_s": 30.0, "max_start_failures": 2, **limits}
    return RoomWatch("run-1", **settings)


def timed_out() -> states.TrainControllerState:
    return states.ReschedulingState(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)))


def start(room: RoomWatch, previous: states.TrainControllerState) -> None:
    room.after_controller_state_update(previous, SCHEDULING)
    room._shape = (2, {"CPU": 2})


def try_again(room: RoomWatch, clock: Clock, seconds: float) -> None:
    """One try of the start that finds no room for `seconds`, as Ray Train reports it."""
    clock.now += seconds
    room.after_controller_state_update(SCHEDULING, timed_out())
    room.after_controller_state_update(timed_out(), SCHEDULING)


def test_a_first_start_waits_as_long_as_it_takes_and_a_restart_within_wait_for_workers_s(clock):
    room = watch()
    start(room, states.InitializingState())
    for _ in range(10):
        try_again(room, clock, HOUR)  # ten hours without room: still waiting, no error
    room.after_controller_state_update(SCHEDULING, states.RunningState())
    failure = ControllerError(RuntimeError("lost node"))
    start(room, states.RestartingState(failure))
    try_again(room, clock, 20)
    with pytest.raises(NoRoomError) as raised:
        try_again(room, clock, 20)  # 40 s after the restart began: past wait_for_workers_s (30 s)
    assert str(raised.value) == (
        "the cluster had no room for the run's 2 workers within failure.wait_for_workers_s "
        "(a lost node not replaced, or too few resources)"
    )


def test_wait_for_room_s_bounds_the_first_start(clock):
    room = watch(wait_for_room_s=100.0, wait_for_workers_s=5.0)
    start(room, states.InitializingState())
    try_again(room, clock, 60)  # past wait_for_workers_s, which is for restarts only
    with pytest.raises(NoRoomError, match=r"within failure\.wait_for_room_s \(100 s\)$"):
        try_again(room, clock, 60)


def test_workers_that_die_while_starting_are_tried_max_failures_times(clock):
    room = watch(max_start_failures=2)
    start(room, states.InitializingState())
    died = states.ReschedulingState(ControllerError(WorkerGroupStartupFailedError("worker died")))
    for _ in range(2):
        room.after_controller_state_update(SCHEDULING, died)
    with pytest.raises(StartFailedError, match=r"failed to start 3 times \(failure.max_failures: 2\)"):
        room.after_controller_state_update(SCHEDULING, died)


def test_a_wait_is_announced_and_its_end_too(capsys, monkeypatch):
    room = RoomWatch(
        "run-1",
        wait_for_room_s=None,
        wait_for_workers_s=30.0,
        max_start_failures=2,
        notice_after_s=0.05,
    )
    pickle.loads(pickle.dumps(room))  # it travels to the controller before any start
    monkeypatch.setattr(RoomWatch, "_pending_group_like_ours", lambda self: True)
    room.after_controller_state_update(states.InitializingState(), SCHEDULING)
    room.before_worker_group_start(SimpleNamespace(num_workers=2, resources_per_worker={"CPU": 2.0}))
    deadline = time.monotonic() + 10
    while "waiting for resources" not in capsys.readouterr().out:
        assert time.monotonic() < deadline, "no announcement"
        time.sleep(0.05)
    assert room.before_init_train_context([]) == {}
    assert "[run run-1] workers placed after" in capsys.readouterr().out


def test_a_start_placed_quickly_announces_nothing(capsys):
    room = watch()
    room.after_controller_state_update(states.InitializingState(), SCHEDULING)
    room.before_worker_group_start(SimpleNamespace(num_workers=1, resources_per_worker={"CPU": 1.0}))
    room.before_init_train_context([])
    room.after_controller_state_update(SCHEDULING, states.RunningState())
    assert capsys.readouterr().out == ""


# --- slots ---------------------------------------------------------------------------------------------


def test_slots_go_first_come_first_served_and_never_beyond_the_limit(clock):
    slots = TrialSlots(2)
    assert slots.take("a") and slots.take("b")
    assert not slots.take("c") and not slots.take("d")  # c asked first
    assert slots.take("a")  # a renewal
    slots.give_back("a")
    assert not slots.take("d")  # c's turn
    assert slots.take("c")
    assert not slots.take("d")
    assert slots.holders() == ["b", "c"]


def test_a_slot_not_renewed_is_free_again_after_the_lease(clock):
    slots = TrialSlots(1)
    assert slots.take("dead")  # its process was killed: it never gives the slot back
    assert not slots.take("next")
    clock.now += LEASE_S / 2
    assert not slots.take("next")
    clock.now += LEASE_S / 2 + 1
    assert slots.take("next")
    assert slots.holders() == ["next"]
