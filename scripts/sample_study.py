"""Write a small synthetic CT study (3 series x 5 slices, Patient ID PAT001, Accession Number
ACC001) as Part 10 files, for trying the service: ``python scripts/sample_study.py FOLDER``."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.synthetic import write_ct_study


def main() -> None:
    """Write the study and print its folder."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    paths = write_ct_study(folder)
    print(f"{len(paths)} instances written to {folder}")


if __name__ == "__main__":
    main()
