"""bench/report.py renders BENCHMARKS.md from bench/results.json: a renderer bug must not wait for the end
of a 25-minute `make bench` to show. (No timing here: the numbers are the committed ones.)"""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_report():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_committed_results_render_to_the_committed_benchmarks_md():
    report = load_report()
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    assert report.render(results) == (ROOT / "BENCHMARKS.md").read_text()


def test_every_section_renders_alone_with_its_verdicts():
    report = load_report()
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    for section, (verdict, header) in {
        "floor": ("1. step vs compute floor", "## 1. Ours vs the compute floor"),
        "trl": ("2a. time per step, ours / TRL", "## 2. Ours vs TRL"),
        "memory": ("3a. peak RSS K=20 / K=1", "## 3. Memory vs K"),
        "ray": ("4b. Ray Train + MLflow per-step overhead", "## 4. Ray"),
    }.items():
        alone = {
            k: v for k, v in results.items() if k not in {"floor", "trl", "memory", "ray"} or k == section
        }
        text = report.render(alone)
        assert verdict in text and header in text, section
