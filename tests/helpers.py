"""Helpers shared by several test modules (fixtures stay in conftest.py)."""

from __future__ import annotations

import multiprocessing
import socket
import traceback
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(target: Callable, rank: int, port: int, args: tuple, results) -> None:
    try:
        results.put((rank, None, target(rank, port, *args)))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))


def run_ranks(target: Callable, world_size: int, *args, timeout: float = 240.0) -> list:
    """Run `target(rank, port, *args)` in `world_size` spawned processes; their return values by rank.

    `port` is a free loopback port for `init_process_group(init_method=f"tcp://127.0.0.1:{port}")`.
    A rank that raises fails the caller with its traceback; no wait is longer than `timeout`.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(target, rank, port, args, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = sorted((results.get(timeout=timeout) for _ in processes), key=lambda o: o[0])
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [error for _, error, _ in outcomes if error]
    if errors:
        raise AssertionError(f"a rank failed:\n{errors[0]}")
    return [value for _, _, value in outcomes]
