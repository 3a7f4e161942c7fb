"""What the media digest memo saves: hashing every file against a memo hit on its stat signature.

`ContentDigests` rehashes a file only when its (size, mtime_ns, inode, ctime_ns) changed. This
writes N small files into a temporary dir, then times, each in the same process and with the files
in the page cache: hashing every file (what a memo-less run, or a run after `tar -x`, pays), a
warm memo (a stat and a lookup per file) and the memo read from its JSON file first (what every
later run pays). Prints both and their ratio
measured in this one run.

    python benchmarks/bench_media_digests.py [--files 10000] [--size 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcollapse.store.digest import ContentDigests, file_sha256  # noqa: E402


def write_files(root: Path, n: int, size: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = root / f"clip-{i:06d}.wav"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def digests_through(memo_path: Path, paths: list[Path]) -> list[str]:
    """What a run pays: the memo read from the store, then every file checked against it."""
    digests = ContentDigests(memo_path)
    return [digests(p) for p in paths]


def best_of(repeats: int, work) -> float:
    """The fastest of `repeats` timings: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=4096, help="bytes per file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_files(Path(tmp), args.files, args.size)
        memo = ContentDigests(Path(tmp) / "memo.json")
        for path in paths:  # fills the memo (and the page cache)
            memo(path)
        memo.save()
        hash_all = best_of(args.repeats, lambda: [file_sha256(p) for p in paths])
        warm_memo = best_of(args.repeats, lambda: [memo(p) for p in paths])
        memo_from_disk = best_of(args.repeats, lambda: digests_through(Path(tmp) / "memo.json", paths))
    print(f"{args.files} files of {args.size} bytes, best of {args.repeats}")
    print(f"  hash every file:             {hash_all:8.3f} s")
    print(f"  warm memo (stat signature):  {warm_memo:8.3f} s")
    print(f"  memo read from disk + check: {memo_from_disk:8.3f} s")
    print(f"  hash-every-file / warm-memo ratio: {hash_all / warm_memo:.1f}x")
    print(f"  hash-every-file / memo-from-disk ratio: {hash_all / memo_from_disk:.1f}x")


if __name__ == "__main__":
    main()
