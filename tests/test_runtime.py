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


ZEN3 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
ZEN4 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu avx2 avx512f avx512dq avx512bw\n"
ZEN5 = ZEN4.replace(": 25", ": 26")
INTEL = "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\nflags\t\t: fpu avx2 avx512f avx512dq\n"


def test_zen4_is_family_25_with_avx512_only():
    from mergesmith.runtime import is_zen4

    assert is_zen4(ZEN4)
    assert not is_zen4(ZEN3)  # same family, no AVX-512
    assert not is_zen4(ZEN5)  # its compress-store is fast
    assert not is_zen4(INTEL)
    assert not is_zen4("")
    assert not is_zen4(ZEN4.replace("avx512f ", "avx512fx "))  # whole flag names, not substrings


def _numpy_choice(cpu_info: str, **env) -> str:
    """NPY_DISABLE_CPU_FEATURES after tune_for_streaming in a child that sees `cpu_info` as its first CPU."""
    code = (
        "import os; import mergesmith.runtime as r; "
        f"r._first_cpu_info = lambda: {cpu_info!r}; r.tune_for_streaming(); "
        "print(os.environ.get('NPY_DISABLE_CPU_FEATURES'))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NPY_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True).stdout.strip()


def test_numpy_sorts_without_avx512_on_zen4_only():
    from mergesmith.runtime import _numpy_version, numpy_avx512_targets

    assert _numpy_choice(ZEN4) == numpy_avx512_targets(_numpy_version())
    assert _numpy_choice(ZEN3) == "None"
    assert _numpy_choice(INTEL) == "None"


def test_numpy_choice_of_the_user_is_kept():
    assert _numpy_choice(ZEN4, NPY_DISABLE_CPU_FEATURES="AVX512_ICL") == "AVX512_ICL"
    assert _numpy_choice(ZEN4, NPY_ENABLE_CPU_FEATURES="X86_V3") == "None"  # numpy refuses both variables at once


def test_numpy_loads_without_a_warning_under_the_zen4_choice():
    # a target name this numpy does not dispatch would be an ImportWarning, here an error
    from mergesmith.runtime import _numpy_version, numpy_avx512_targets

    assert _numpy_version() >= (1, 24)
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": numpy_avx512_targets(_numpy_version())}
    code = "import numpy as np; print(np.sort(np.array([3, 1, 2], dtype=np.int32)).tolist())"
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[1, 2, 3]"
