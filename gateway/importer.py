"""``passerelle import``: bulk import of Part 10 files and folders into the store."""

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from storage.store import IngestResult, Outcome, Store


@dataclass
class ImportSummary:
    """Counts of an import, with the reason of every rejection."""

    imported: int = 0
    duplicates: int = 0
    conflicts: int = 0
    skipped: int = 0
    rejected: list[tuple[Path, str]] = field(default_factory=list)

    def add(self, path: Path, result: IngestResult) -> None:
        """Account for the outcome of one file."""
        if result.outcome is Outcome.STORED:
            self.imported += 1
        elif result.outcome is Outcome.DUPLICATE:
            self.duplicates += 1
        elif result.outcome is Outcome.CONFLICT:
            self.conflicts += 1
        else:
            self.rejected.append((path, f"{result.reason}: {result.message}"))

    def report(self) -> str:
        """Human-readable summary, one line per rejected file."""
        lines = [f"imported: {self.imported}", f"duplicates: {self.duplicates}",
                 f"conflicts (replaced the stored object): {self.conflicts}",
                 f"skipped (DICOMDIR): {self.skipped}", f"rejected: {len(self.rejected)}"]
        reasons = Counter(reason.split(":", 1)[0] for _, reason in self.rejected)
        lines += [f"  {count} {reason}" for reason, count in reasons.most_common()]
        lines += [f"  {path}: {reason}" for path, reason in self.rejected]
        return "\n".join(lines)


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for folder, _, files in os.walk(path):
                for name in sorted(files):
                    yield Path(folder) / name
        else:
            yield path


def import_paths(store: Store, paths: list[Path], jobs: int = 4,
                 progress: bool = True) -> ImportSummary:
    """Import every file under ``paths`` (folders recursively) with ``jobs`` writers."""
    summary = ImportSummary()
    files: list[Path] = []
    for path in _walk(paths):
        if path.name.upper() == "DICOMDIR":  # media index (PS3.10 8), not an instance
            summary.skipped += 1
        else:
            files.append(path)

    def ingest(path: Path) -> tuple[Path, IngestResult | OSError]:
        try:
            return path, store.ingest_path(path, source="import")
        except OSError as exc:
            return path, exc

    with ThreadPoolExecutor(max_workers=jobs) as pool, \
            tqdm(total=len(files), unit="file", disable=not progress) as bar:
        for path, result in pool.map(ingest, files):
            if isinstance(result, OSError):
                summary.rejected.append((path, f"unreadable-file: {result.strerror}"))
            else:
                summary.add(path, result)
            bar.update()
    return summary
