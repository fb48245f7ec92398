"""Bad input, everywhere it enters: every command rejects malformed input with exit status 2, one line
per problem naming the field or file, no traceback, and nothing written.

The config battery itself (every field's rule) is in test_config.py; this one covers each command and
each kind of file input once: YAML syntax, wrong types, unknown keys, out-of-range numbers, missing and
unreadable files, a directory where a file belongs, adapters from another model, safetensors files with
missing or mis-shaped keys, an empty prompt file, a URI with an unknown scheme.

`train` and `sweep` must fail in validation, before anything starts Ray or opens a run: the battery
replaces what would start them with a tripwire.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from alignprop_ray.cli import main
from alignprop_ray.engine.lora import WEIGHT_NAME, attach_lora, save_adapter
from alignprop_ray.engine.models import load_parts
from tests.helpers import lora_settings
from tests.test_config import BASE, with_change

SWEEP = {"base": BASE, "space": {"train.lr": {"grid": [1e-3, 1e-2]}}}
COMPARISON = {
    "base": {
        **{k: v for k, v in BASE.items() if k != "truncation"},  # AlignProp's: the other methods have none
        "train": {**BASE["train"], "max_wall_seconds": 5},
    },
    "compare": {"methods": ["alignprop", {"name": "draft", "k": 1}], "lr_scales": [1, 2], "seeds": [0, 1]},
}
DIR = None  # a `files` value: make a directory
SAMPLE = ["sample", "--model", "tiny", "--prompt", "x", "--steps", "1", "--out", "x.png"]


@dataclass
class Case:
    id: str
    argv: list[str]  # "{fx}" is the shared fixture folder; relative paths are in the case's empty cwd
    expected: list[str]  # one per stderr line: a fragment of it that names the field or file
    files: dict[str, object] = field(default_factory=dict)  # cwd inputs: dict -> YAML, str/bytes, DIR


def sweep_with(dotted: str, value) -> dict:
    data = {**SWEEP, "base": dict(BASE)}
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[last] = value
    return data


CASES = [
    # --- validate -------------------------------------------------------------------------------------
    Case(
        "validate-yaml-syntax",
        ["validate", "e.yaml"],
        ["e.yaml: invalid YAML at line 1"],
        {"e.yaml": "model: ["},
    ),
    Case(
        "validate-top-level-list",
        ["validate", "e.yaml"],
        ["e.yaml: the top level must be a mapping"],
        {"e.yaml": "- a\n"},
    ),
    Case(
        "validate-wrong-type",
        ["validate", "e.yaml"],
        ["train.lr: input should be a valid number"],
        {"e.yaml": with_change("train.lr", "fast")},
    ),
    Case(
        "validate-unknown-key",
        ["validate", "e.yaml"],
        ["bogus: unknown field"],
        {"e.yaml": {**BASE, "bogus": 1}},
    ),
    Case(
        "validate-out-of-range",
        ["validate", "e.yaml"],
        ["scaling.num_workers: must be >= 1 (got 0)"],
        {"e.yaml": with_change("scaling.num_workers", 0)},
    ),
    Case(
        "validate-two-problems-two-lines",
        ["validate", "e.yaml", "--set", "train.lr=-1"],
        ["scaling.num_workers: must be >= 1", "train.lr: must be > 0"],
        {"e.yaml": with_change("scaling.num_workers", 0)},
    ),
    Case(
        "validate-regularizers-out-of-range",
        ["validate", "e.yaml", "--set", "train.kl_weight=-0.1", "--set", "train.ema_decay=1.5"],
        ["train.kl_weight: must be >= 0 (got -0.1)", "train.ema_decay: must be < 1 (got 1.5)"],
        {"e.yaml": BASE},
    ),
    Case(
        "validate-kl-weight-of-a-method-without-kl",
        ["validate", "e.yaml", "--set", "train.kl_weight=0.1"],
        ["train.kl_weight: ddpo has no KL-to-base term, so 0.1 would have no effect"],
        {
            "e.yaml": {
                **{k: v for k, v in BASE.items() if k != "truncation"},  # AlignProp's
                "method": {"name": "ddpo"},
                "sampling": {"steps": 10, "eta": 1.0},
            }
        },
    ),
    Case("validate-missing-file", ["validate", "nope.yaml"], ["nope.yaml: no such file"]),
    Case("validate-file-is-directory", ["validate", "conf"], ["conf: cannot read"], {"conf": DIR}),
    Case(
        "validate-unreadable-bytes",
        ["validate", "e.yaml"],
        ["e.yaml: cannot read"],
        {"e.yaml": b"\xff\xfe\x00\x81binary"},
    ),
    Case(
        "validate-empty-prompt-file",
        ["validate", "e.yaml"],
        ["prompts.train: prompt file"],
        {"e.yaml": with_change("prompts.train", "empty.txt"), "empty.txt": "# nothing\n\n"},
    ),
    Case(
        "validate-missing-prompt-file",
        ["validate", "e.yaml"],
        ["prompts.eval: 'missing.txt' is neither a built-in prompt set"],
        {"e.yaml": with_change("prompts.eval", "missing.txt")},
    ),
    Case(
        "validate-prompt-file-is-directory",
        ["validate", "e.yaml"],
        ["pdir is not a file"],
        {"e.yaml": with_change("prompts.train", "pdir"), "pdir": DIR},
    ),
    Case(
        "validate-uri-unknown-scheme",
        ["validate", "e.yaml"],
        ["tracking.uri: unsupported scheme 'ftp'"],
        {"e.yaml": with_change("tracking.uri", "ftp://host/x")},
    ),
    Case(
        "validate-model-dir-not-a-pipeline",
        ["validate", "e.yaml"],
        ["mdir is not a diffusers pipeline directory"],
        {"e.yaml": with_change("model.pretrained", "./mdir"), "mdir": DIR},
    ),
    Case(
        "validate-set-unknown-key",
        ["validate", "e.yaml", "--set", "train.lrr=1"],
        ["train.lrr: unknown field"],
        {"e.yaml": BASE},
    ),
    Case(
        "validate-set-without-value",
        ["validate", "e.yaml", "--set", "train.lr"],
        ["--set train.lr: expected KEY=VALUE"],
        {"e.yaml": BASE},
    ),
    # --- train ----------------------------------------------------------------------------------------
    Case("train-yaml-syntax", ["train", "e.yaml"], ["e.yaml: invalid YAML"], {"e.yaml": "train: {lr: 1\n"}),
    Case(
        "train-wrong-type",
        ["train", "e.yaml"],
        ["sampling.steps: input should be a valid integer"],
        {"e.yaml": with_change("sampling.steps", "ten")},
    ),
    Case(
        "train-unknown-key",
        ["train", "e.yaml"],
        ["train.bogus: unknown field"],
        {"e.yaml": with_change("train.bogus", 1)},
    ),
    Case(
        "train-out-of-range",
        ["train", "e.yaml"],
        ["train.lr: must be > 0"],
        {"e.yaml": with_change("train.lr", -1.0)},
    ),
    Case("train-missing-file", ["train", "nope.yaml"], ["nope.yaml: no such file"]),
    Case("train-file-is-directory", ["train", "conf"], ["conf: cannot read"], {"conf": DIR}),
    Case(
        "train-empty-prompt-file",
        ["train", "e.yaml"],
        ["prompts.eval: prompt file"],
        {"e.yaml": with_change("prompts.eval", "empty.txt"), "empty.txt": ""},
    ),
    Case(
        "train-storage-unknown-scheme",
        ["train", "e.yaml"],
        ["storage.path: unsupported scheme 'ftp'"],
        {"e.yaml": with_change("storage.path", "ftp://host/x")},
    ),
    Case(
        "train-set-uri-unknown-scheme",
        ["train", "e.yaml", "--set", "tracking.uri=gopher://host/x"],
        ["tracking.uri: unsupported scheme 'gopher'"],
        {"e.yaml": BASE},
    ),
    Case(
        "train-bad-run-name",
        ["train", "e.yaml", "--name", "my run"],
        ["argument --name: 'my run': use letters"],
        {"e.yaml": BASE},
    ),
    # --- sweep ----------------------------------------------------------------------------------------
    Case("sweep-yaml-syntax", ["sweep", "s.yaml"], ["s.yaml: invalid YAML"], {"s.yaml": "space: [\n"}),
    Case("sweep-missing-file", ["sweep", "nope.yaml"], ["nope.yaml: no such file"]),
    Case("sweep-file-is-directory", ["sweep", "conf"], ["conf: cannot read"], {"conf": DIR}),
    Case(
        "sweep-unknown-key", ["sweep", "s.yaml"], ["bogus: unknown field"], {"s.yaml": {**SWEEP, "bogus": 1}}
    ),
    Case(
        "sweep-space-wrong-type",
        ["sweep", "s.yaml"],
        ["space.train.lr: value 'fast': train.lr: input should be a valid number"],
        {"s.yaml": {**SWEEP, "space": {"train.lr": {"grid": [1e-3, "fast"]}}}},
    ),
    Case(
        "sweep-out-of-range",
        ["sweep", "s.yaml"],
        ["tune.num_samples: must be >= 1"],
        {"s.yaml": sweep_with("tune.num_samples", 0)},
    ),
    Case(
        "sweep-base-missing-file",
        ["sweep", "s.yaml"],
        ["nope.yaml: no such file"],
        {"s.yaml": {**SWEEP, "base": "nope.yaml"}},
    ),
    Case(
        "sweep-base-empty-prompt-file",
        ["sweep", "s.yaml"],
        ["base.prompts.train: prompt file"],
        {"s.yaml": sweep_with("base.prompts.train", "empty.txt"), "empty.txt": "\n"},
    ),
    Case(
        "sweep-uri-unknown-scheme",
        ["sweep", "s.yaml", "--set", "tracking.uri=ftp://host/x"],
        ["base.tracking.uri: unsupported scheme 'ftp'"],
        {"s.yaml": SWEEP},
    ),
    Case(
        "sweep-ui-url-unknown-scheme",
        ["sweep", "s.yaml", "--ui-url", "ftp://host"],
        ["--ui-url must look like"],
        {"s.yaml": SWEEP},
    ),
    Case(
        "sweep-register-bad-name",
        ["sweep", "s.yaml", "--register", "a/b"],
        ["model name 'a/b'"],
        {"s.yaml": SWEEP},
    ),
    # --- compare ---------------------------------------------------------------------------------------
    Case(
        "compare-without-a-time-budget",
        ["compare", "c.yaml", "--set", "train.max_wall_seconds=null"],
        ["base.train.max_wall_seconds: required: the protocol gives every trial the same seconds"],
        {"c.yaml": COMPARISON},
    ),
    Case(
        "compare-one-lr-for-all",
        ["compare", "c.yaml", "--set", "train.lr=1e-3"],
        ["base.train.lr: leave it unset"],
        {"c.yaml": COMPARISON},
    ),
    Case(
        "compare-with-a-space-and-a-zero-scale",
        ["compare", "c.yaml", "--set", "compare.lr_scales=[0, 1]"],
        ["space: a comparison has no space", "compare.lr_scales.0: must be > 0 (got 0)"],
        {"c.yaml": {**COMPARISON, "space": {"train.lr": {"grid": [1e-3]}}}},
    ),
    Case(
        "compare-a-method-sets-its-seed-and-its-time",
        ["compare", "c.yaml"],
        [
            "compare.methods.1.set.train.seed: set by the protocol (compare.seeds)",
            "compare.methods.1.set.train.max_wall_seconds: the same for every method",
        ],
        {
            "c.yaml": {
                **COMPARISON,
                "compare": {
                    **COMPARISON["compare"],
                    "methods": [
                        "alignprop",
                        {"method": "refl", "set": {"train.seed": 3, "train.max_wall_seconds": 9}},
                    ],
                },
            }
        },
    ),
    Case(
        "compare-two-methods-one-label",
        ["compare", "c.yaml", "--set", "compare.methods=[{name: draft}, {name: draft, k: 1}]"],
        ["compare.methods.1: its label 'draft-K1' is method 0's too"],
        {"c.yaml": COMPARISON},
    ),
    Case(
        "compare-a-setting-of-another-method",
        ["compare", "c.yaml", "--set", "compare.methods=[alignprop, {name: draft, kk: 1}]"],
        ["compare.methods.1.kk: not a setting of method draft"],
        {"c.yaml": COMPARISON},
    ),
    Case(
        "sweep-on-a-comparison-file",
        ["sweep", "c.yaml"],
        ["compare: this is a comparison file: run it with `alignprop-ray compare FILE`"],
        {"c.yaml": COMPARISON},
    ),
    # --- sample ---------------------------------------------------------------------------------------
    Case("sample-non-integer-steps", [*SAMPLE, "--steps", "many"], ["--steps: invalid int value"]),
    # the sampler flags follow the rules of the experiment fields they stand for (sampling.*, model.resolution)
    Case(
        "sample-negative-steps",
        [*SAMPLE, "--steps", "-3"],
        ["argument --steps: must be >= 1 (got -3), as sampling.steps in an experiment"],
    ),
    Case("sample-too-many-steps", [*SAMPLE, "--steps", "1001"], ["argument --steps: must be <= 1000"]),
    Case(
        "sample-negative-guidance",
        [*SAMPLE, "--guidance", "-3"],
        ["argument --guidance: must be >= 0 (got -3.0), as sampling.guidance_scale in an experiment"],
    ),
    Case("sample-guidance-nan", [*SAMPLE, "--guidance", "nan"], ["argument --guidance: must be >= 0"]),
    Case(
        "sample-eta-above-1",
        [*SAMPLE, "--eta", "2"],
        ["argument --eta: must be <= 1 (got 2.0), as sampling.eta in an experiment"],
    ),
    Case("sample-negative-eta", [*SAMPLE, "--eta", "-0.1"], ["argument --eta: must be >= 0"]),
    Case(
        "sample-resolution",
        [*SAMPLE, "--resolution", "30"],
        ["argument --resolution: must be a multiple of 8 (got 30), as model.resolution"],
    ),
    Case("sample-zero-resolution", [*SAMPLE, "--resolution", "0"], ["argument --resolution: must be > 0"]),
    Case("sample-no-images", [*SAMPLE, "--n", "0"], ["--n must be positive, got 0"]),
    Case("sample-seed-out-of-range", [*SAMPLE, "--seed", str(2**64)], ["--seed must be in"]),
    Case(
        "sample-eta-without-ddim",
        [*SAMPLE, "--family", "sdxl", "--eta", "0.5"],
        ["needs a DDIM scheduler; this model samples with EulerDiscreteScheduler"],
    ),
    Case(
        "sample-missing-model-dir",
        ["sample", "--model", "./nope", "--prompt", "x", "--out", "x.png"],
        ["model ./nope: no such directory"],
    ),
    Case(
        "sample-model-dir-not-a-pipeline",
        ["sample", "--model", "mdir", "--prompt", "x", "--out", "x.png"],
        ["model mdir: not a diffusers pipeline directory"],
        {"mdir": DIR},
    ),
    Case(
        "sample-model-is-a-file",
        ["sample", "--model", "./m.bin", "--prompt", "x", "--out", "x.png"],
        ["model ./m.bin: not a diffusers pipeline directory"],
        {"m.bin": b"\0"},
    ),
    Case(
        "sample-uncached-hub-id-offline",
        ["sample", "--model", "nobody-here/no-such-model", "--prompt", "x", "--out", "x.png"],
        ["nobody-here/no-such-model: weights not found"],
    ),
    Case("sample-missing-adapter", [*SAMPLE, "--adapter", "nope"], ["adapter nope: no"]),
    Case(
        "sample-adapter-dir-without-weights",
        [*SAMPLE, "--adapter", "adir"],
        ["adapter adir: no"],
        {"adir": DIR},
    ),
    Case(
        "sample-adapter-unreadable-safetensors",
        [*SAMPLE, "--adapter", "{fx}/corrupt"],
        ["corrupt/" + WEIGHT_NAME + ": not a readable safetensors file"],
    ),
    Case(
        "sample-adapter-of-another-family",
        [*SAMPLE, "--adapter", "{fx}/sdxl"],
        ["sdxl: made for a sdxl model, but the model is sd"],
    ),
    Case(
        "sample-adapter-of-another-model",
        [*SAMPLE, "--adapter", "{fx}/foreign"],
        ["foreign: module nowhere is not in this sd denoiser"],
    ),
    Case(
        "sample-adapter-mis-shaped-key",
        [*SAMPLE, "--adapter", "{fx}/misshaped"],
        ["misshaped: down_blocks."],
    ),
    Case(
        "sample-adapter-missing-lora-keys",
        [*SAMPLE, "--adapter", "{fx}/no_lora"],
        ["no_lora/" + WEIGHT_NAME + ": not a LoRA adapter"],
    ),
    Case(
        "sample-adapter-missing-lora-b",
        [*SAMPLE, "--adapter", "{fx}/no_b"],
        ["no_b/" + WEIGHT_NAME + ": down_blocks."],
    ),
    Case("sample-out-without-image-suffix", [*SAMPLE[:-1], "x"], ["--out x: give an image file name"]),
    Case(
        "sample-images-into-a-file",
        [*SAMPLE[:-1], "x.png", "--n", "2"],
        ["--out x.png is a file; 2 images need a folder"],
        {"x.png": "x"},
    ),
    Case(
        "sample-out-below-a-file",
        [*SAMPLE[:-1], "f.txt/x.png"],
        ["--out f.txt/x.png: f.txt is a file"],
        {"f.txt": "x"},
    ),
    Case(
        "sample-out-is-a-directory",
        [*SAMPLE[:-1], "outdir"],
        ["--out outdir is a directory"],
        {"outdir": DIR},
    ),
    # --- mix ------------------------------------------------------------------------------------------
    Case(
        "mix-alpha-out-of-range",
        ["mix", "{fx}/sd", "{fx}/sd", "--alpha", "2", "--out", "m"],
        ["--alpha must be in [0, 1]"],
    ),
    Case(
        "mix-alpha-nan",
        ["mix", "{fx}/sd", "{fx}/sd", "--alpha", "nan", "--out", "m"],
        ["--alpha must be in [0, 1]"],
    ),
    Case(
        "mix-alpha-not-a-number",
        ["mix", "{fx}/sd", "{fx}/sd", "--alpha", "half", "--out", "m"],
        ["argument --alpha: invalid float value"],
    ),
    Case(
        "mix-missing-adapter",
        ["mix", "{fx}/sd", "nope", "--alpha", "0.5", "--out", "m"],
        ["adapter nope: no"],
    ),
    Case(
        "mix-unreadable-safetensors",
        ["mix", "{fx}/corrupt", "{fx}/sd", "--alpha", "0.5", "--out", "m"],
        ["not a readable safetensors file"],
    ),
    Case(
        "mix-missing-lora-keys",
        ["mix", "{fx}/sd", "{fx}/no_lora", "--alpha", "0.5", "--out", "m"],
        ["no_lora/" + WEIGHT_NAME + ": not a LoRA adapter"],
    ),
    Case(
        "mix-adapters-of-two-families",
        ["mix", "{fx}/sd", "{fx}/sdxl", "--alpha", "0.5", "--out", "m"],
        ["cannot mix adapters of different model families"],
    ),
    Case(
        "mix-mis-shaped-key",
        ["mix", "{fx}/sd", "{fx}/misshaped", "--alpha", "0.5", "--out", "m"],
        ["misshaped: their down_blocks."],
    ),
    Case(
        "mix-adapter-missing-lora-b",
        ["mix", "{fx}/no_b", "{fx}/sd", "--alpha", "0.5", "--out", "m"],
        ["no_b/" + WEIGHT_NAME + ": down_blocks."],
    ),
    Case(
        "mix-factors-different-ranks",
        ["mix", "{fx}/sd", "{fx}/sd_r2", "--alpha", "0.5", "--method", "factors", "--out", "m"],
        ["--method factors needs adapters with the same modules, rank and alpha"],
    ),
    Case(
        "mix-out-is-a-file",
        ["mix", "{fx}/sd", "{fx}/sd", "--alpha", "0.5", "--out", "m.txt"],
        ["--out m.txt is a file"],
        {"m.txt": "x"},
    ),
    # --- report ---------------------------------------------------------------------------------------
    Case("report-no-store-in-cwd", ["report", "--out", "rep"], ["no MLflow store at mlflow.db"]),
    Case(
        "report-missing-store",
        ["report", "--tracking-uri", "sqlite:///nope.db", "--out", "rep"],
        ["no MLflow store at nope.db"],
    ),
    Case(
        "report-store-is-a-directory",
        ["report", "--tracking-uri", "sqlite:///sdir", "--out", "rep"],
        ["no MLflow store at sdir"],
        {"sdir": DIR},
    ),
    Case(
        "report-unreadable-store",
        ["report", "--tracking-uri", "sqlite:///bad.db", "--out", "rep"],
        ["cannot read the MLflow store sqlite:///bad.db"],
        {"bad.db": b"not a database" * 100},
    ),
    Case(
        "report-uri-unknown-scheme",
        ["report", "--tracking-uri", "ftp://host/x", "--out", "rep"],
        ["tracking URI ftp://host/x: unsupported scheme 'ftp'"],
    ),
    Case(
        "report-out-is-a-file",
        ["report", "--tracking-uri", "sqlite:///nope.db", "--out", "rep.html"],
        ["--out rep.html is a file"],
        {"rep.html": "x"},
    ),
    Case(
        "report-out-below-a-file",
        ["report", "--tracking-uri", "sqlite:///nope.db", "--out", "f.txt/rep"],
        ["--out f.txt/rep: f.txt is a file"],
        {"f.txt": "x"},
    ),
    # --- make-tiny-model ------------------------------------------------------------------------------
    Case(
        "make-tiny-model-unknown-family",
        ["make-tiny-model", "d", "--family", "sd9"],
        ["argument --family: invalid choice"],
    ),
    Case(
        "make-tiny-model-seed-not-integer",
        ["make-tiny-model", "d", "--seed", "x"],
        ["argument --seed: invalid int value"],
    ),
    Case(
        "make-tiny-model-seed-out-of-range",
        ["make-tiny-model", "d", "--seed", str(-(2**64))],
        ["--seed must be in"],
    ),
    Case(
        "make-tiny-model-dir-is-a-file", ["make-tiny-model", "f.txt"], ["dir f.txt is a file"], {"f.txt": "x"}
    ),
    Case(
        "make-tiny-model-parent-is-a-file",
        ["make-tiny-model", "f.txt/d"],
        ["dir f.txt/d: f.txt is a file"],
        {"f.txt": "x"},
    ),
]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """Adapters for the tiny models: good ones (sd rank 4 and 2, sdxl) and broken ones, made once."""
    root = tmp_path_factory.mktemp("bad-input")
    for name, family, rank in (("sd", "sd", 4), ("sd_r2", "sd", 2), ("sdxl", "sdxl", 4)):
        parts = load_parts("tiny", family=family)
        attach_lora(parts.denoiser, lora_settings(rank=rank, alpha=rank))
        save_adapter(parts.denoiser, root / name)
    with safe_open(str(root / "sd" / WEIGHT_NAME), framework="pt") as f:
        state, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    first_a = next(k for k in state if ".lora_A." in k)
    broken = {
        "misshaped": {**state, first_a: torch.zeros(4, state[first_a].shape[1] + 3)},
        "foreign": {
            **state,
            "unet.nowhere.lora_A.weight": torch.zeros(4, 8),
            "unet.nowhere.lora_B.weight": torch.zeros(8, 4),
        },
        "no_lora": {"unet.conv_in.weight": torch.zeros(2, 2)},
        "no_b": {k: v for k, v in state.items() if k != first_a.replace(".lora_A.", ".lora_B.")},
    }
    for name, tensors in broken.items():
        (root / name).mkdir()
        save_file(tensors, str(root / name / WEIGHT_NAME), metadata=header)
    (root / "corrupt").mkdir()
    (root / "corrupt" / WEIGHT_NAME).write_bytes(b"not a safetensors file")
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


class StartedWork(BaseException):
    """A train or sweep got past validation (it would now open an MLflow run and start Ray)."""


def tripwire(*args, **kwargs):
    raise StartedWork


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_exit_2_and_one_line_per_problem(case, fx, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for var in ("ALIGNPROP_TRACKING_URI", "MLFLOW_TRACKING_URI", "ALIGNPROP_STORAGE_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("alignprop_ray.train.launch.run_training", tripwire)
    monkeypatch.setattr("alignprop_ray.sweep.launch.run_sweep", tripwire)
    monkeypatch.setattr("alignprop_ray.sweep.compare.run_comparison", tripwire)
    for name, content in case.files.items():
        path = tmp_path / name
        if content is DIR:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(yaml.safe_dump(content))
    before, fixtures = snapshot(tmp_path), snapshot(fx)

    try:
        code = main([arg.replace("{fx}", str(fx)) for arg in case.argv])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    err = capsys.readouterr().err

    assert code == 2, err
    assert "Traceback" not in err and not any(line.startswith("  File") for line in err.splitlines()), err
    lines = err.splitlines()
    command = case.argv[0]
    assert all(line.startswith(f"alignprop-ray {command}: error: ") for line in lines), err
    assert len(lines) == len(case.expected), err
    for fragment in case.expected:
        assert any(fragment in line for line in lines), (fragment, err)
    assert snapshot(tmp_path) == before, "left behind or changed"
    assert snapshot(fx) == fixtures
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


# --- refusals next to existing runs ---------------------------------------------------------------------
# A command refused with exit 2 leaves every run of the store as it found it: no run added, and each run's
# status, end time, params, metrics and tags unchanged (a refused rerun once marked a FINISHED run RUNNING).

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
STORE_SWEEP = {"name": "lrs", "base": {**BASE, "tracking": {"experiment": "tiny"}}, "space": SWEEP["space"]}


@dataclass
class Refusal:
    id: str
    argv: list[str]  # "{uri}", "{runs}", "{train_run}", "{sweep_run}": the store fixture's
    expected: str  # a fragment of the one stderr line
    tune_state: bool = False  # pretend the sweep's Tune state is on disk (Tuner.can_restore)


STORE_SETS = ["--set", "tracking.uri={uri}", "--set", "storage.path={runs}"]
REFUSALS = [
    Refusal(
        "train-rerun-with-other-settings",
        ["train", str(TINY), *STORE_SETS, "--set", "train.steps=2", "--set", "train.lr=0.5"],
        "run 'tiny' exists with train.lr=0.01 (now 0.5); use another --name",
    ),
    Refusal(
        "train-rerun-by-name-with-other-settings",
        ["train", str(TINY), *STORE_SETS, "--set", "train.steps=3", "--name", "tiny"],
        "run 'tiny' exists with train.steps=2 (now 3)",
    ),
    Refusal(
        "sweep-name-taken-in-mlflow",
        ["sweep", "{sweep_file}", "--set", "tracking.uri={uri}", "--set", "storage.path={runs}"],
        "MLflow experiment 'tiny' already has a run named 'lrs'",
    ),
    Refusal(
        "sweep-resume-without-state",
        ["sweep", "{sweep_file}", "--set", "tracking.uri={uri}", "--set", "storage.path={runs}", "--resume"],
        "nothing to resume: no sweep 'lrs'",
    ),
    Refusal(
        "sweep-resume-with-other-settings",
        [
            "sweep",
            "{sweep_file}",
            *("--set", "tracking.uri={uri}", "--set", "storage.path={runs}", "--set", "train.steps=5"),
            "--resume",
        ],
        "base.train.steps was 4 when sweep 'lrs' started (now 5)",
        tune_state=True,
    ),
    Refusal(
        "register-a-run-without-adapter",
        ["register", "--run", "{train_run}", "--name", "m", "--tracking-uri", "{uri}"],
        "has no adapter/" + WEIGHT_NAME + " artifact",
    ),
    Refusal(
        "register-a-sweep-without-best-trial",
        ["register", "--run", "{sweep_run}", "--name", "m", "--tracking-uri", "{uri}"],
        "which has no best trial (yet)",
    ),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, str]:
    """What `train sweeps/tiny.yaml --set train.steps=2` and an interrupted sweep leave in an MLflow store:
    a FINISHED training run with its params and metrics; the sweep's KILLED parent run. Written through
    the functions `train` and `sweep` use (no Ray)."""
    from alignprop_ray import tracking
    from alignprop_ray.config import load_experiment
    from alignprop_ray.sweep import tracking as sweep_tracking
    from alignprop_ray.sweep.config import load_sweep

    root = tmp_path_factory.mktemp("store")
    paths = {"uri": f"sqlite:///{root / 'mlflow.db'}", "runs": str(root / "runs")}
    cfg = load_experiment(
        TINY, [f"tracking.uri={paths['uri']}", f"storage.path={paths['runs']}", "train.steps=2"]
    )
    uri = cfg.tracking.uri
    run_id, _ = tracking.start_run(uri, "tiny", "tiny", cfg.flat_params(), cfg.to_yaml())
    for step in (1, 2):
        tracking.RunLogger(uri, run_id).log_metrics(
            {"train/loss": 1.0 / step, "train/reward": 0.1 * step}, step
        )
    tracking.end_run(uri, run_id)
    (root / "lrs.yaml").write_text(yaml.safe_dump(STORE_SWEEP))
    sweep = load_sweep(root / "lrs.yaml", [f"tracking.uri={uri}", f"storage.path={paths['runs']}"])
    parent, _ = sweep_tracking.start_parent(uri, "tiny", sweep, "name: lrs\n")
    tracking.end_run(uri, parent, "KILLED")
    return {**paths, "train_run": run_id, "sweep_run": parent, "sweep_file": str(root / "lrs.yaml")}


def store_state(uri: str) -> dict:
    """Every run of every experiment: status, end time, params, metrics (each key's history) and tags."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {
        run.info.run_id: (
            run.info.status,
            run.info.end_time,
            run.data.params,
            {
                k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
                for k in run.data.metrics
            },
            run.data.tags,
        )
        for run in client.search_runs(experiments)
    }


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_a_refused_command_leaves_every_run_as_it_found_it(case, store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for var in ("ALIGNPROP_TRACKING_URI", "MLFLOW_TRACKING_URI", "ALIGNPROP_STORAGE_PATH"):
        monkeypatch.delenv(var, raising=False)
    # past every check, the command would start Ray: it must have been refused before
    monkeypatch.setattr("alignprop_ray.train.launch.connect_ray", tripwire)
    if case.tune_state:
        from ray import tune

        monkeypatch.setattr(tune.Tuner, "can_restore", classmethod(lambda cls, path, *args: True))
    before = store_state(store["uri"])

    code = main([arg.format(**store) for arg in case.argv])

    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and case.expected in lines[0], err
    assert store_state(store["uri"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "left something in the working directory"
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
