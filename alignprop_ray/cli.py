"""`alignprop-ray` command line. Each subcommand's handler lives in the module named for its concept.

Handlers are imported lazily so `alignprop-ray validate` does not pay for importing torch or Ray.
Any UserError becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from alignprop_ray import __version__
from alignprop_ray.engine.families.registry import AUTO, FAMILIES
from alignprop_ray.errors import UserError

DESCRIPTION = (
    "Fine-tune text-to-image diffusion models (Stable Diffusion) on a differentiable reward with AlignProp:\n"
    "backpropagate the reward through the last K denoising steps into LoRA adapters, on Ray Train, with\n"
    "sweeps on Ray Tune and every run in MLflow."
)
FIRST_STEPS = """first steps:
  alignprop-ray validate sweeps/tiny.yaml     check a config (one line per problem)
  alignprop-ray train sweeps/tiny.yaml        train on the offline tiny model (CPU is enough)
  alignprop-ray demo                          a small sweep, then: mlflow ui --backend-store-uri ...

every subcommand has its own --help; configs: sweeps/*.yaml, schema: alignprop_ray/config/schema.py"""

# subcommand -> "module:function"; the function takes the parsed argparse.Namespace.
HANDLERS = {
    "train": "alignprop_ray.train.launch:cmd_train",
    "sweep": "alignprop_ray.sweep.launch:cmd_sweep",
    "compare": "alignprop_ray.sweep.compare:cmd_compare",
    "validate": "alignprop_ray.cli:cmd_validate",
    "sample": "alignprop_ray.engine.commands:cmd_sample",
    "mix": "alignprop_ray.engine.commands:cmd_mix",
    "make-tiny-model": "alignprop_ray.engine.commands:cmd_make_tiny_model",
    "report": "alignprop_ray.report:cmd_report",
    "demo": "alignprop_ray.sweep.launch:cmd_demo",
    "register": "alignprop_ray.registry:cmd_register",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own status for usage errors)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _run_name(text: str) -> str:
    """`train --name`: the same rule as the config's `name` (it names the MLflow run and storage folder)."""
    import re

    from alignprop_ray.config.schema import ExperimentConfig

    pattern = next(
        m.pattern for m in ExperimentConfig.model_fields["name"].metadata if getattr(m, "pattern", None)
    )
    if not re.fullmatch(pattern, text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return text


def _as_field(dotted: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type` for a flag that stands for the config field `dotted` (`sample --eta` for
    `sampling.eta`): `convert`ed, then held to the field's own rules in the schema, so the flag and an
    experiment refuse the same values."""

    def parse(text: str) -> Any:
        from alignprop_ray.config.experiment import field_problems

        value = convert(text)  # a ValueError reads "invalid <convert's name> value"
        problems = field_problems(dotted, value)
        if problems:
            raise argparse.ArgumentTypeError(f"{problems[0]}, as {dotted} in an experiment")
        return value

    parse.__name__ = convert.__name__
    return parse


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by its dotted name, e.g. --set train.lr=3e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alignprop-ray",
        description=DESCRIPTION,
        epilog=FIRST_STEPS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one experiment on Ray Train")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--name", type=_run_name, help="run name; rerunning with the same name resumes it")
    _add_verbose(p)
    _add_overrides(p)

    p = sub.add_parser("sweep", help="run a Ray Tune sweep")
    p.add_argument("config", help="sweep YAML")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument(
        "--register",
        metavar="NAME",
        help="then register the best trial's adapter as a new version of model NAME (see `register`)",
    )
    _add_sweep_console(p)
    _add_overrides(p)

    p = sub.add_parser(
        "compare",
        help="compare training methods by the protocol of docs/methods.md: each method's lr picked on one "
        "seed, then more seeds at it, equal training time; rerun to continue",
    )
    p.add_argument(
        "config", help="comparison YAML (a sweep file with a compare: section; sweeps/methods.yaml)"
    )
    _add_verbose(p)
    _add_overrides(p)

    p = sub.add_parser("validate", help="validate an experiment, sweep or comparison YAML and exit")
    p.add_argument("config")
    _add_overrides(p)

    p = sub.add_parser("sample", help="generate images (same output as the model's diffusers pipeline)")
    p.add_argument("--model", required=True, help="'tiny', a hub id, or a diffusers pipeline directory")
    p.add_argument(
        "--family",
        default="auto",
        choices=[AUTO, *FAMILIES],
        help="model family; auto: from the pipeline's model_index.json (tiny: sd)",
    )
    p.add_argument("--adapter", help="LoRA adapter directory (pytorch_lora_weights.safetensors)")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0, help="image i of prompt j uses seed + j*n + i")
    p.add_argument("--steps", type=_as_field("sampling.steps", int), default=50)
    p.add_argument("--guidance", type=_as_field("sampling.guidance_scale", float), default=7.5)
    p.add_argument(
        "--eta",
        type=_as_field("sampling.eta", float),
        default=0.0,
        help="DDIM only (Euler and flow matching: 0)",
    )
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument(
        "--resolution",
        type=_as_field("model.resolution", int),
        help="pixels (default: the model's native size)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--grid", action="store_true", help="several images: write one grid PNG at --out")
    p.add_argument("--out", required=True, help="PNG path (one image or --grid) or a folder")

    p = sub.add_parser("mix", help="interpolate two LoRA adapters: alpha*A + (1-alpha)*B")
    p.add_argument("adapter_a")
    p.add_argument("adapter_b")
    p.add_argument("--alpha", type=float, required=True, help="weight of A, in [0, 1]")
    p.add_argument(
        "--method",
        default="update",
        choices=["update", "factors"],
        help="update: exact interpolation of the updates B@A (rank r1+r2); factors: the paper's mixing, A and B "
        "averaged separately (update alpha^2 dW_a + (1-alpha)^2 dW_b + cross terms; docs/fidelity.md)",
    )
    p.add_argument("--out", required=True)

    p = sub.add_parser("report", help="plots and an HTML page from an MLflow experiment")
    p.add_argument("--experiment", help="MLflow experiment name (default: the most recent)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--target",
        type=float,
        help="a comparison's table (alignprop-ray compare) adds the training seconds and images each method's "
        "runs took to first reach this eval/reward",
    )

    p = sub.add_parser("make-tiny-model", help="write a tiny random-init pipeline as a diffusers directory")
    p.add_argument("dir")
    p.add_argument("--family", default="sd", choices=FAMILIES, help="model family (default: sd)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "demo", help="the README demo: sweeps/demo.yaml on the toy-shapes model, then its report"
    )
    p.add_argument("--workdir", default="demo-output")
    _add_sweep_console(p)

    p = sub.add_parser(
        "register",
        help="put a run's adapter in MLflow's Model Registry as a model that draws images (mlflow models serve)",
    )
    p.add_argument("--run", required=True, help="MLflow run id of a training run, or of a sweep (its best)")
    p.add_argument("--name", required=True, help="registered model name; each call adds a version")
    p.add_argument("--tracking-uri", default=None, help="default: as training (ALIGNPROP_TRACKING_URI, ...)")
    return parser


def _add_sweep_console(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ui-url",
        metavar="URL",
        help="address of the MLflow UI for the links printed at the end (default: the tracking server, or "
        "http://127.0.0.1:5000 where `mlflow ui` serves a database store)",
    )
    _add_verbose(p)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="all of Ray's and Tune's console, with the lines hidden by default (alignprop_ray/console.py: "
        "Tune's TensorBoard hint and resource line, Ray's warnings about its own actors)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    """`alignprop-ray validate FILE [--set k=v ...]`: print `OK: FILE (experiment|sweep|comparison)` or raise
    ConfigError."""
    from alignprop_ray.config import load_experiment, read_yaml
    from alignprop_ray.sweep.config import is_sweep, load_sweep
    from alignprop_ray.sweep.protocol import is_comparison, load_comparison

    data = read_yaml(args.config)
    if is_comparison(data):
        load_comparison(args.config, args.overrides)
        kind = "comparison"
    elif is_sweep(data):
        load_sweep(args.config, args.overrides)
        kind = "sweep"
    else:
        load_experiment(args.config, args.overrides)
        kind = "experiment"
    print(f"OK: {args.config} ({kind})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = HANDLERS[args.command].split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except UserError as err:
        for line in str(err).splitlines() or ["(no message)"]:
            print(f"alignprop-ray {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
