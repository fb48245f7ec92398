"""Shared fixtures. Everything runs offline on the tiny model; one Ray instance serves the whole session."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.stores import postgres, postgres_mlflow  # noqa: E402, F401 (fixtures, for every test module)

# Two threads, unless OMP_NUM_THREADS says otherwise (tests/run_tiers.py and `make test-fast` set it to 1:
# for the tests' own process and their subprocesses alike).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny preset written as a diffusers pipeline directory (once per session)."""
    from alignprop_ray.engine.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box two OpenMP threads
    competing with other processes' tests stall at barriers (measured: one 8-step run took 2 s with one
    thread and 9 to 74 s with two). A module opts in with `pytestmark = pytest.mark.usefixtures(...)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub_reachable(monkeypatch):
    """Validate as a user with network access would: hf:// weight refs count as downloadable.

    Shipped GPU experiments name reward weights on the Hugging Face Hub, fetched when training starts.
    Validation never touches the network, but with HF_HUB_OFFLINE=1 (as `make test` sets) and an empty
    cache it rightly flags them; that is the user's machine state, not a defect of the file.
    """
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "is_offline_mode", lambda: False)


@pytest.fixture
def tiny_parts():
    from alignprop_ray.engine.models import load_parts

    return load_parts("tiny")


# Files whose place in the order matters to the tier without Ray (tests/run_tiers.py): the longest first, so
# that it does not end the tier alone; the one that compiles what it compiled last, from Inductor's cache.
RUN_FIRST, RUN_LAST = "test_gpu_check.py", "test_speed_levers.py"


def pytest_collection_modifyitems(config, items):
    """Tests that start their own Ray instances run first, while no shared instance is up: a command
    looking for a cluster to join must not find the session's (and 2 cores cannot host both). Then
    RUN_FIRST, the rest in collection order, RUN_LAST (a stable sort: the same order in every xdist worker)."""

    def rank(item) -> tuple[bool, int]:
        place = {RUN_FIRST: 0, RUN_LAST: 2}.get(item.path.name, 1)
        return item.get_closest_marker("own_ray") is None, place

    items.sort(key=rank)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (starting Ray costs 10-20 s).

    Private, as `alignprop-ray train` starts its own (compat.ray_init_private): Ray's own processes in it
    (Train's PlacementGroupCleaner) look their cluster up by address "auto", and with a second instance on
    the machine, such as one the other tier of `make test` started, every cleaner died. A dead controller's
    placement group would then keep its CPUs, and a later trial wait for room without end (how CI hung in
    test_compare.py on 2026-12-07, by all signs; that last step was not reproduced)."""
    import ray

    from alignprop_ray.compat import ray_init_private

    # Ray's runtime-env agent tries a failing runtime_env 3 times; the one test of a runtime_env that cannot
    # build (test_reward_service.py) needs one failure, not three.
    os.environ.setdefault("RUNTIME_ENV_RETRY_TIMES", "1")
    if not ray.is_initialized():
        ray_init_private(
            num_cpus=2, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def method_sweep(ray_session, tmp_path_factory):
    """The sweep over the method rows that test_methods.py and test_mlflow_ui.py share (tests/method_sweep.py)."""
    from tests.method_sweep import run_method_sweep
    from tests.test_methods import SWEPT

    return run_method_sweep(ray_session, tmp_path_factory.mktemp("methods"), SWEPT)


@pytest.fixture(autouse=True)
def _no_ray_outside_the_ray_tier(request):
    """A test not marked ray or own_ray starts no Ray instance: it would run in `make test`'s other tier,
    beside the Ray tier's instance, for the rest of that tier (Ray's API starts one by itself, e.g. on
    `ray.get_runtime_context().get_accelerator_ids()`)."""

    def running() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    before = running()
    yield
    marked = request.node.get_closest_marker("ray") or request.node.get_closest_marker("own_ray")
    if not marked and not before and running():
        sys.modules["ray"].shutdown()
        pytest.fail(
            "this test started a Ray instance: mark it ray (and use ray_session), or keep Ray out of it"
        )


# MLflow's `set_tracking_uri` exports MLFLOW_TRACKING_URI, which `train`/`sweep` honour (README: tracking URI
# precedence): a test that calls it in this process must not steer the commands that later tests start.
_TRACKING_ENV = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "ALIGNPROP_TRACKING_URI")}


def pytest_runtest_teardown(item, nextitem):
    for key, value in _TRACKING_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
