"""Command-line usage errors, through the real entry point in a subprocess: exit code 2, exactly one line on
stderr (``error: <command path or option>: <problem>``) that names the option or command, no traceback.

Each case starts the interpreter (seconds each, mostly importing PyTorch): the module is marked ``slow``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dgmrec
from dgmrec.data.mmrec import write_mmrec
from dgmrec.data.synthetic import make_synthetic

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("usage") / "data"
    write_mmrec(make_synthetic(n_users=40, n_items=60, modalities=(("image", 4), ("text", 3)),
                               interactions_per_user=6, seed=2, name="usage"), path)
    return path


@pytest.fixture(scope="module")
def run_dir(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("usage") / "run"
    dgmrec.train("MFBPR", folder, out=out, progress=False, overrides={"epochs": 1})
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m dgmrec.cli ARGS`` with this checkout's package first on the path."""
    src = str(Path(dgmrec.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", "dgmrec.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_the_entry_point_runs():
    done = cli("models")
    assert done.returncode == 0, done.stderr
    assert "DGMRec" in done.stdout.split()


# (case id, arguments, text the one line must contain); {run} and {folder} are filled in
CASES = [
    ("missing-option", ["recommend"], ["dgmrec recommend", "Missing option '--run'"]),
    ("missing-option-of-train", ["train", "--model", "MFBPR", "--out", "x"], ["dgmrec train", "'--data'"]),
    ("missing-argument", ["data", "check"], ["dgmrec data check", "Missing argument 'FOLDER'"]),
    ("unknown-option", ["recommend", "--run", "{run}", "--bogus", "1"], ["dgmrec recommend", "--bogus"]),
    ("unknown-command", ["nosuch"], ["dgmrec", "No such command 'nosuch'"]),
    ("unknown-subcommand", ["data", "nosuch"], ["dgmrec data", "No such command 'nosuch'"]),
    ("wrong-type-int", ["recommend", "--run", "{run}", "--k", "abc"], ["dgmrec recommend", "'--k'"]),
    ("wrong-type-float", ["data", "make-mask", "{folder}", "--ratio", "lots", "--out", "m.npz"],
     ["dgmrec data make-mask", "'--ratio'"]),
    ("out-of-range-k", ["recommend", "--run", "{run}", "--k", "0"], ["--k", "at least 1"]),
    ("out-of-range-ratio", ["data", "make-mask", "{folder}", "--ratio", "1.5", "--out", "{tmp}/m.npz"],
     ["ratio", "[0, 1]"]),
    # options that feed a configuration key are named as the option, not as a --set override
    ("out-of-range-threads", ["train", "--model", "MFBPR", "--data", "{folder}", "--out", "{tmp}/r", "--threads",
                              "-1"], ["'--threads'", "0"]),
    ("unknown-precision", ["train", "--model", "MFBPR", "--data", "{folder}", "--out", "{tmp}/r", "--precision",
                           "fp8"], ["--precision", "'fp8'", "bf16"]),
    ("out-of-range-port", ["serve", "--run", "{run}", "--port", "99999"], ["dgmrec serve", "'--port'"]),
]


@pytest.mark.parametrize(("args", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_usage_error_is_one_line_and_exit_2(args, needles, request, tmp_path):
    fill = {"run": "", "folder": "", "tmp": str(tmp_path)}
    if any("{run}" in a for a in args):
        fill["run"] = str(request.getfixturevalue("run_dir"))
    if any("{folder}" in a for a in args):
        fill["folder"] = str(request.getfixturevalue("folder"))
    done = cli(*[a.format(**fill) for a in args])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:  # typer releases differ in the case of argument names
        assert needle.lower() in lines[0].lower(), lines[0]
    assert done.stdout == ""


def test_serve_on_a_port_in_use_is_one_line_and_exit_2(run_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = cli("serve", "--run", str(run_dir), "--port", str(port))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines == [lines[0]] and lines[0].startswith("error: --port: cannot listen on"), done.stderr
    assert done.stdout == ""
