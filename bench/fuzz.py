"""Run the fuzz targets of tests/test_fuzz.py far longer than the suite does.

    .venv/bin/python bench/fuzz.py [--examples 50000] [-k accept]

Each target (Accept parser, QIDO parser + SQLite search, multipart reader, UID to path
mapping) gets ``--examples`` generated inputs; a failure prints the smallest input that
breaks it, as hypothesis found it.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("-k", default="", help="only the targets whose name has this")
    args = parser.parse_args()
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q", "-p",
               "no:cacheprovider", "--hypothesis-profile=long", "--hypothesis-show-statistics",
               "-k", args.k]
    env = {**os.environ, "PASSERELLE_FUZZ_EXAMPLES": str(args.examples)}
    code = subprocess.run(command, cwd=REPO, env=env, check=False).returncode
    print(f"{args.examples} examples per target in {time.monotonic() - started:.0f} s: "
          f"{'no failure' if code == 0 else 'FAILURES above'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
