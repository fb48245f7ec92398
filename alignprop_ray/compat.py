"""Every use of another library's private names, in one place.

Ray, MLflow and open_clip move their internals between releases. Each function here wraps one such
access and says which version it was written against; tests/test_compat.py calls each of them on the
installed versions, so an upgrade that moves one breaks here, in one place, loudly.
"""

from __future__ import annotations


def ray_local_instances() -> set[str]:
    """GCS addresses of every Ray instance running on this machine, read afresh from the process table.

    Ray 2.60: `ray._private.services.find_gcs_addresses` (it caches a non-empty answer: cleared first).
    """
    from ray._private import services

    services.find_gcs_addresses.cache_clear()
    return set(services.find_gcs_addresses())


def ray_started_cluster_address() -> str | None:
    """The address of a cluster started with `ray start` on this machine, if it is still running.

    `ray start` records the address in /tmp/ray/ray_current_cluster (a private instance started by
    `ray.init()` does not); the file outlives a crashed cluster, so the address only counts while a GCS
    serves it. Ray 2.60: `ray._private.utils.read_ray_address`.
    """
    from ray._private import utils

    address = utils.read_ray_address()
    return address if address and address in ray_local_instances() else None
