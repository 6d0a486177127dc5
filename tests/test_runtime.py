"""The command line's process settings (mergesmith.runtime): made before torch loads, user settings win."""

import os
import subprocess
import sys

PROBE = (
    "import gc, os, sys; from mergesmith.runtime import tune_for_streaming; tune_for_streaming(); "
    "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules, gc.get_threshold()[0])"
)


def _probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_spin_count_is_set_before_torch_loads():
    assert _probe()[:2] == ["3000", "False"]


def test_garbage_collector_runs_less_often():
    assert _probe()[2] == "100000"


def test_user_settings_win():
    assert _probe(GOMP_SPINCOUNT="77")[0] == "77"
    assert _probe(OMP_WAIT_POLICY="PASSIVE")[0] == "None"  # a wait policy of their own: no spin count added


def test_cli_applies_it(tmp_path):
    # `mergesmith methods` goes through main(): the variable must be in the environment torch would see
    code = "import os, sys; from mergesmith.cli import main; main(['methods']); print('SPIN', os.environ.get('GOMP_SPINCOUNT'))"
    clean = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "SPIN 3000"


def test_garbage_collector_choice_of_the_user_is_kept():
    code = "import gc; gc.set_threshold(0); from mergesmith.runtime import tune_for_streaming; tune_for_streaming(); print(gc.get_threshold()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def _entry(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` then the console script's entry point with `args`, in a child process, output piped."""
    script = f"import sys; {code}; from mergesmith.cli import entry; sys.argv = ['mergesmith', *{list(args)!r}]; entry()"
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell has it
    return subprocess.run([sys.executable, "-c", script], env=buffered, capture_output=True, text=True)


def test_quick_exit_flushes_output_and_runs_exit_handlers():
    # piped stdout is block-buffered: without the flush, os._exit would drop the listing
    done = _entry("import atexit; atexit.register(lambda: print('handler ran'))", "methods")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert any(line.startswith("ties: ") for line in lines), done.stdout
    assert lines[-1] == "handler ran"


def test_quick_exit_keeps_the_exit_code_of_a_user_error(tmp_path):
    done = _entry("pass", "merge", str(tmp_path / "missing.yml"), str(tmp_path / "out"))
    assert done.returncode == 2
    assert "missing.yml" in done.stderr and "Traceback" not in done.stderr


def test_compiled_loops_load_without_importing_scipy_linalg_and_leave_it_importable():
    # numba's BLAS check would import scipy.linalg on the loops' first load; in the command line's process it
    # is hidden for that moment only: afterwards it imports as usual, and the loops run
    import importlib.util

    import pytest

    if importlib.util.find_spec("scipy") is None or importlib.util.find_spec("numba") is None:
        pytest.skip("needs scipy and numba installed")
    code = (
        "import sys, numpy as np; from mergesmith.runtime import tune_for_streaming; tune_for_streaming()\n"
        "from mergesmith.methods import _kernels\n"
        "assert _kernels.available()\n"
        "x = np.array([1, 2, 3], np.uint16); out = np.empty(3, np.float32)\n"
        "_kernels.loops().magnitudes_into(x, np.zeros(3, np.uint16), out)\n"
        "print('LOADED', 'scipy.linalg' in sys.modules, 'scipy' in sys.modules)\n"
        "import scipy.linalg\n"
        "print('LINALG', scipy.linalg.norm([3.0, 4.0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    # whatever numba's own import loaded of SciPy (its top level, in numba 0.68) stays loaded
    numba_loads = subprocess.run([sys.executable, "-c", "import sys, numba; print('scipy' in sys.modules)"],
                                 capture_output=True, text=True, check=True).stdout.split()[-1]
    assert out[-2] == f"LOADED False {numba_loads}"
    assert out[-1] == "LINALG 5.0"
