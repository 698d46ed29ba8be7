"""Running a test script under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before Triton is imported,
so the script runs in a subprocess that can import the test modules)."""

import os
import subprocess
import sys

try:
    import triton
except ImportError:
    triton = None


def usable() -> bool:
    if triton is None:
        return False
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)  # older interpreters fail on numpy >= 2.4 (int() of 1-element arrays)


def run_script(script: str, tmp_path) -> str:
    """Run script (which should print "interpreter ok" at its end) in the interpreter; fail with its stderr."""
    (tmp_path / "run.py").write_text(script)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "interpreter ok" in proc.stdout
    return proc.stdout
