"""The floors of the house: the benchmark wing stands on the library, and nothing below it
imports it."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path


def test_the_library_loads_without_the_benchmark_wing():
    # a fresh process: this one may have imported the wing through other tests
    probe = (
        "import json, sys\n"
        "import keras_perceiver.converters, keras_perceiver.presets\n"
        "import keras_perceiver.converters.flamingo, keras_perceiver.converters.transformers_perceiver\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[:2] == ['keras_perceiver', 'benchmarks'])))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing the converters and the presets loaded {loaded}"


ROOT = Path(__file__).resolve().parents[1]
# the command line is the top floor: it hands the bench* commands to the wing
ABOVE_THE_LIBRARY = {"keras_perceiver/cli.py", "keras_perceiver/__main__.py"}


def _imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_library_module_imports_the_benchmark_wing_even_inside_a_function():
    sources = [p for folder in ("keras_perceiver", "converters", "zoo") for p in sorted((ROOT / folder).rglob("*.py"))]
    reaching_up = {
        str(path.relative_to(ROOT)): name
        for path in sources
        if str(path.relative_to(ROOT)) not in ABOVE_THE_LIBRARY
        for name in _imported_modules(path)
        if name == "keras_perceiver.benchmarks" or name.startswith("keras_perceiver.benchmarks.")
    }
    assert len(sources) > 10 and reaching_up == {}
