"""transformers' own model tests as a check of "cocoa_triton".

    python tools/transformers_suite/run.py [--work DIR] [--json OUT] [-- PYTEST_ARGS...]

Fetches the installed transformers release's source distribution from PyPI at run time (never
copied into this repository), takes its common test mixins (``tests/test_modeling_common.py``
and the files it imports; the two mixins the sdist does not carry, generation and export, are
stubbed empty), and runs ``ModelTesterMixin`` on the Qwen2 and Qwen2-VL testers beside this file
twice: as transformers ships it ("sdpa") and with every "sdpa" model running "cocoa_triton"
(``conftest.py`` beside this file). Prints and writes passed / failed / skipped per run and the
tests that fail only with ours. Needs pip access to PyPI and the ``parameterized`` package.

Schedule: run by hand whenever the pinned or the newest transformers changes, once per stack
(``.venv`` and ``.venv-newest``); the last results are committed as
``docs/transformers-suite/transformers-<version>.json`` and quoted in README.md. CI does not run
it (a download, and a minute or two per implementation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMPLS = ("sdpa", "cocoa_triton")
STUBS = {  # what test_modeling_common imports that the sdist does not ship
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def prepare(work: Path, version: str) -> Path:
    """``work/hf_tests``: the sdist's tests/*.py, the stubs, and our testers in ``hf_tests/cocoa``."""
    package = work / "hf_tests"
    if not (package / "test_modeling_common.py").is_file():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"transformers=={version}", "-d", str(work)], check=True)
        sdist = work / f"transformers-{version}.tar.gz"
        package.mkdir(exist_ok=True)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    (package / parts[2]).write_bytes(tar.extractfile(member).read())
        (package / "__init__.py").write_text("")
        for rel, text in STUBS.items():
            (package / rel).parent.mkdir(exist_ok=True)
            (package / rel).parent.joinpath("__init__.py").write_text("")
            (package / rel).write_text(text)
    ours = package / "cocoa"
    ours.mkdir(exist_ok=True)
    (ours / "__init__.py").write_text("")
    for tester in HERE.glob("test_*_cocoa.py"):
        shutil.copy2(tester, ours / tester.name)
    shutil.copy2(HERE / "conftest.py", work / "conftest.py")
    return package


def run_impl(work: Path, impl: str, pytest_args: list[str]) -> dict:
    report = work / f"junit-{impl}.xml"
    env = {**os.environ, "COCOA_SUITE_IMPL": impl}
    env.pop("TRITON_INTERPRET", None)  # the CPU path on CPU tensors, as users run it
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "hf_tests/cocoa", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={report}", *pytest_args], cwd=work, env=env)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            failed.append({"test": name, "message": (node.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failed, "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="where the sdist's tests are unpacked (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    import torch
    import transformers

    try:
        import parameterized  # noqa: F401
    except ImportError:
        raise SystemExit("transformers' tests need the parameterized package: pip install parameterized") from None
    work = Path(args.work or tempfile.mkdtemp(prefix="transformers-suite-")) / f"transformers-{transformers.__version__}"
    prepare(work, transformers.__version__)
    result = {"transformers": transformers.__version__, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "pytest_args": pytest_args, "runs": {}}
    for impl in IMPLS:
        result["runs"][impl] = run_impl(work, impl, pytest_args)
    base = {f["test"] for f in result["runs"]["sdpa"]["failures"]}
    result["only_ours_fail"] = sorted(f["test"] for f in result["runs"]["cocoa_triton"]["failures"]
                                      if f["test"] not in base)
    for impl, run in result["runs"].items():
        print(f"{impl}: {run['passed']} passed, {run['failed']} failed, {run['skipped']} skipped ({run['seconds']} s)")
    print("failing with cocoa_triton only:", *result["only_ours_fail"], sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
