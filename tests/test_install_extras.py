"""Without the "transformers" extra, ``import cocoa`` works and every use names the extra to install."""

from __future__ import annotations

import subprocess
import sys

# Make ``import transformers`` fail as it does when the package is not installed.
HIDE = "import sys; sys.modules['transformers'] = None; "


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + code], capture_output=True, text=True, timeout=120)


def test_import_cocoa_without_transformers_names_the_extra():
    done = _run("import cocoa, cocoa_kernels; print(cocoa.ATTN_IMPLEMENTATION); cocoa.Embedder")
    assert done.stdout.strip() == "cocoa_triton"  # the import itself worked
    assert "ModuleNotFoundError" in done.stderr and 'pip install "cocoa[transformers]"' in done.stderr


def test_cli_without_transformers_names_the_extra():
    done = _run("from cocoa.cli import main; main(['demo', '--out', 'unused'])")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cocoa demo: the package 'transformers' is not installed" in done.stderr
    assert 'pip install "cocoa[transformers]"' in done.stderr


def test_other_missing_modules_are_not_disguised():
    done = _run("import cocoa; from cocoa import missing_extra; "
                "print(missing_extra(ModuleNotFoundError('x', name='some_other_package')))")
    assert done.stdout.strip() == "None"
