"""`finetune cache`: what the feature and decoded-image caches hold on this machine, and the
start-up check's kept verdicts, and clearing them (`finetune cache clear`). All live under
trainer.cache_dir; only the files this tool names there are counted or removed.
"""

import argparse
import os
import re

from finetune.config.schemas import TrainerConfig

CACHES = {  # name: (folder under trainer.cache_dir, the names of its files)
    "feature cache": ("", re.compile(r"[0-9a-f]{32}\.pt")),  # features.cache_key's
    "image cache": ("images", re.compile(r"[0-9a-f]+\.(u8|idx\.pt)")),  # data and index files
    "image checks": ("checks", re.compile(r"[0-9a-f]{64}\.json")),  # image_check's verdicts
}


def entries(cache_dir: str) -> dict[str, tuple[str, list[str]]]:
    """The cache files under `cache_dir`, per cache: (its folder, its files)."""
    found = {}
    for name, (place, pattern) in CACHES.items():
        folder = os.path.join(cache_dir, place) if place else cache_dir
        files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        found[name] = (folder, [os.path.join(folder, file) for file in files
                                if pattern.fullmatch(file) and os.path.isfile(os.path.join(folder, file))])
    return found


def size_text(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="finetune cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="?", choices=["list", "clear"], default="list")
    parser.add_argument("--dir", default=TrainerConfig.cache_dir,
                        help="trainer.cache_dir of the runs (default %(default)s)")
    options = parser.parse_args(arguments)
    cache_dir = os.path.expanduser(options.dir)
    for name, (folder, files) in entries(cache_dir).items():
        size = sum(os.path.getsize(path) for path in files)
        if options.action == "clear":
            for path in files:
                os.remove(path)
            print(f"{name}: removed {len(files)} files ({size_text(size)}) from {folder}")
        else:
            print(f"{name}: {len(files)} files, {size_text(size)} in {folder}")
    if options.action == "list":
        where = "" if options.dir == TrainerConfig.cache_dir else f" --dir {options.dir}"
        print(f"clear them all: finetune cache clear{where}")
    return 0
