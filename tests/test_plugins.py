"""Reward plugins from a package outside alignprop_ray, written to a temporary folder by the test: named
by import path or through the `alignprop_ray.rewards` entry-point group, checked at validate time."""

import textwrap

import pytest
import torch

from alignprop_ray.cli import main
from alignprop_ray.rewards import available_rewards, validate_reward_spec
from alignprop_ray.rewards.mixture import build_reward
from tests.helpers import tiny_learner, train_steps

PLUGIN = '''
import torch


def redness(images, prompts):
    """How much red leads green and blue."""
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


class Brightness(torch.nn.Module):
    def __init__(self, scale=1.0, device=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale), device=device))

    def forward(self, images, prompts):
        return self.scale * images.mean(dim=(1, 2, 3))


def frozen(images, prompts):
    return images.detach().mean(dim=(1, 2, 3))


def scalar(images, prompts):
    return images.mean()


def one_argument(images):
    return images.mean(dim=(1, 2, 3))


def explodes(images, prompts):
    raise RuntimeError("no weights here")


def nan(images, prompts):
    return images.mean(dim=(1, 2, 3)) * float("nan")


NOT_CALLABLE = 3
'''


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """`my_rewards` on sys.path, installed with an entry point `redness` (a dist-info folder beside it)."""
    (tmp_path / "my_rewards").mkdir()
    (tmp_path / "my_rewards" / "__init__.py").write_text(PLUGIN)
    info = tmp_path / "my_rewards-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rewards\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[alignprop_ray.rewards]\nredness = my_rewards:redness\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_an_import_path_and_an_entry_point_name_both_validate(plugin_package):
    assert validate_reward_spec({"my_rewards:redness": 1.0}) == []
    assert validate_reward_spec({"redness": 1.0, "saturation": 0.5}) == []
    assert "redness" in available_rewards()
    spec = {
        "my_rewards:Brightness": {"weight": 2.0, "options": {"scale": 3.0}},
        "my_rewards:redness.weight": 0.5,
    }
    assert validate_reward_spec(spec) == []


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            {"no_such_pkg:reward": 1},
            "reward.no_such_pkg:reward: cannot import no_such_pkg (ModuleNotFoundError",
        ),
        (
            {"my_rewards:missing": 1},
            "reward.my_rewards:missing: module my_rewards has no attribute 'missing'",
        ),
        ({"my_rewards:NOT_CALLABLE": 1}, "reward.my_rewards:NOT_CALLABLE: int is not callable"),
        (
            {"my_rewards:one_argument": 1},
            "reward.my_rewards:one_argument: one_argument must take (images, prompts)",
        ),
        (
            {"my_rewards:scalar": 1},
            "reward.my_rewards:scalar: must return a float tensor of shape (B,) = (2,)",
        ),
        (
            {"my_rewards:explodes": 1},
            "reward.my_rewards:explodes: test call on 2 images failed: RuntimeError",
        ),
        ({"my_rewards:nan": 1}, "reward.my_rewards:nan: returned non-finite values"),
        (
            {"my_rewards:frozen": 1},
            "reward.my_rewards:frozen: not differentiable, cannot be an AlignProp training",
        ),
        (
            {"my_rewards:redness": {"options": {"a": 1}}},
            "reward.my_rewards:redness: options ['a'] given, but",
        ),
        (
            {"my_rewards:Brightness": {"options": {"gamma": 1}}},
            "reward.my_rewards:Brightness: Brightness(gamma=1)",
        ),
        ({"my_rewards:redness": {"wieght": 1}}, "reward.my_rewards:redness.wieght: unknown field"),
    ],
)
def test_a_broken_plugin_is_one_line_naming_it(plugin_package, spec, expected):
    problems = validate_reward_spec(spec)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_non_differentiable_plugin_is_fine_as_a_logged_term(plugin_package):
    assert validate_reward_spec({"my_rewards:frozen": 0.0, "saturation": 1.0}) == []
    assert validate_reward_spec({"my_rewards:frozen": 1.0}, for_training=False) == []


def test_validate_command_checks_plugins(plugin_package, tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(
        textwrap.dedent(
            """
            model: {pretrained: tiny}
            reward: {"my_rewards:scalar": 1.0}
            tracking: {uri: "sqlite:///mlflow.db"}
            """
        )
    )
    assert main(["validate", str(config)]) == 2
    assert "reward.my_rewards:scalar: must return" in capsys.readouterr().err
    config.write_text(config.read_text().replace("scalar", "redness"))
    assert main(["validate", str(config)]) == 0


@pytest.mark.slow
def test_a_plugin_trains_like_a_built_in_reward(plugin_package):
    mixture = build_reward(
        {"my_rewards:Brightness": {"options": {"scale": 2.0}}, "redness": 0.5},
        device="cpu",
        dtype=torch.float32,
    )
    images = torch.rand(3, 3, 16, 16)
    out = mixture(images, ["a", "b", "c"])
    assert set(out.terms) == {"my_rewards:Brightness", "redness"}
    assert torch.allclose(out.terms["my_rewards:Brightness"], 2.0 * images.mean(dim=(1, 2, 3)))
    assert not any(p.requires_grad for p in mixture.parameters())  # a plugin's weights are frozen too
    learner = tiny_learner(mixture, lr=3e-2)
    results = train_steps(learner, 2, truncation="fixed:2")
    assert all(r.updated for r in results) and set(results[0].terms) == set(out.terms)


def test_a_plugin_in_a_dotted_module_path_builds_and_is_logged_under_its_name(plugin_package):
    """`my_pkg.rewards:fn` (the docs' form): torch module names take no dots, the mixture's term names do."""
    (plugin_package / "my_dotted").mkdir()  # a package of its own: other tests keep `my_rewards` imported
    (plugin_package / "my_dotted" / "__init__.py").write_text("")
    (plugin_package / "my_dotted" / "rewards.py").write_text(PLUGIN)
    name = "my_dotted.rewards:redness"
    mixture = build_reward({name: 1.0, "saturation": 0.5}, device="cpu", dtype=torch.float32)
    out = mixture(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert list(out.terms) == [name, "saturation"] and name in mixture.rewards
    assert list(mixture.rewards) == [name, "saturation"] and mixture.rewards[name].differentiable
