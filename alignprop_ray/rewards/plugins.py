"""Reward plugins: a user's own reward, named in a config by import path or entry-point name.

The contract is a built-in reward's: called with images in [0, 1], shape (B, 3, H, W), and one prompt per
image, it returns a float tensor of shape (B,), higher is better. The import path names either

* a function ``reward(images, prompts) -> Tensor``, or
* a class whose instances are such functions (an ``nn.Module`` with that ``forward``, say); its
  constructor gets the term's ``options`` as keyword arguments, plus ``device`` and ``dtype`` where it
  accepts them.

Whether the reward is differentiable is found out by calling it: `check_plugin` calls it on two tiny
images when a config is validated, so a broken plugin is reported before any training starts.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from alignprop_ray.rewards.base import Reward
from alignprop_ray.rewards.options import PluginTerm

PROBE_PROMPTS = ["a red circle", "a blue square"]


class PluginError(Exception):
    """A plugin that cannot serve as a reward; the message is one line."""


class PluginReward(Reward):
    """A plugin function (or instance) behind the `Reward` interface; differentiable if it proved so."""

    def __init__(self, function: Callable, differentiable: bool):
        super().__init__()
        self.function = function
        if isinstance(function, torch.nn.Module):
            self.module = function  # registered, so .to(device) and freezing reach its weights
        self.differentiable = differentiable

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.function(images, list(prompts))


def load_plugin(target: str, term: PluginTerm, *, device: torch.device, dtype: torch.dtype) -> PluginReward:
    """Import `target` (``module:attr``), build it, and probe it; PluginError on any breach of contract."""
    function = _instantiate(_import(target), term, device, dtype)
    _check_signature(function)
    return PluginReward(function, differentiable=_probe(function, device))


def probe_plugin(target: str, term: PluginTerm) -> tuple[str | None, bool]:
    """(why `target` cannot be a reward in one line, or None; whether it is differentiable), found by
    importing and building it and calling it on 2 tiny images."""
    try:
        reward = load_plugin(target, term, device=torch.device("cpu"), dtype=torch.float32)
    except PluginError as err:
        return str(err), False
    return None, reward.differentiable


def _import(target: str) -> object:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise PluginError(f"expected an import path module:attribute, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own error while importing
        raise PluginError(f"cannot import {module_name} ({type(err).__name__}: {_first_line(err)})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(f"module {module_name} has no attribute {attr!r}") from None


def _instantiate(obj: object, term: PluginTerm, device: torch.device, dtype: torch.dtype) -> Callable:
    if not inspect.isclass(obj):
        if term.options:
            raise PluginError(f"options {sorted(term.options)} given, but {_name(obj)} is not a class")
        if not callable(obj):
            raise PluginError(f"{_name(obj)} is not callable")
        return obj
    accepted = inspect.signature(obj).parameters
    extra = {k: v for k, v in {"device": device, "dtype": dtype}.items() if k in accepted}
    try:
        instance = obj(**term.options, **extra)
    except Exception as err:
        call = f"{_name(obj)}({_kwargs(term.options)})"
        raise PluginError(f"{call} failed: {type(err).__name__}: {_first_line(err)}") from None
    if isinstance(instance, torch.nn.Module):
        instance.to(device).requires_grad_(False).eval()
    return instance


def _check_signature(function: Callable) -> None:
    target = function.forward if isinstance(function, torch.nn.Module) else function
    try:
        inspect.signature(target).bind(None, None)
    except TypeError:
        raise PluginError(
            f"{_name(function)} must take (images, prompts); its signature is {inspect.signature(target)}"
        ) from None
    except ValueError:  # builtins without a signature: the test call decides
        pass


def _probe(function: Callable, device: torch.device) -> bool:
    """Call the plugin on 2 tiny images: the output must be finite floats of shape (2,). True if a
    gradient reaches the images."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
    try:
        out = function(images, list(PROBE_PROMPTS))
    except Exception as err:
        raise PluginError(f"test call on 2 images failed: {type(err).__name__}: {_first_line(err)}") from None
    if not isinstance(out, Tensor) or out.shape != (2,) or not out.is_floating_point():
        got = (
            f"a tensor of shape {tuple(out.shape)} and dtype {out.dtype}"
            if isinstance(out, Tensor)
            else type(out)
        )
        raise PluginError(f"must return a float tensor of shape (B,) = (2,) for 2 images, got {got}")
    if not torch.isfinite(out).all():
        raise PluginError(f"returned non-finite values on 2 test images: {out.tolist()}")
    if not out.requires_grad:
        return False
    (grad,) = torch.autograd.grad(out.sum(), images, allow_unused=True)
    return grad is not None and bool(torch.isfinite(grad).all())


def _name(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _kwargs(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""
