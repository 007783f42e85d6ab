"""`pollinate convert [MODEL] [--cache-dir DIR]`: convert a model into per-block shards once.

A node does this implicitly on first start; running it ahead of time (or in a Docker build)
moves the minute of conversion out of the node's start-up. MODEL is a local directory, a
.gguf file, a hub id (downloaded because you named it) or nothing for the embedded SmolLM2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# The environment variable that moves the cache; read here, in the CLI layer, only.
CACHE_ENV = "POLLINATE_CACHE"


def cache_dir_from_cli(value: str | None) -> Path:
    """--cache-dir if given, else $POLLINATE_CACHE, else ~/.cache/pollinate."""
    if value:
        return Path(value).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "pollinate"


def add_cache_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"where converted models live (default: ${CACHE_ENV} or ~/.cache/pollinate)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a local model directory, a .gguf file, a hub id (org/name), or nothing for "
        "the embedded SmolLM2-135M-Instruct",
    )
    add_cache_dir_argument(parser)


def run(args: argparse.Namespace) -> int:
    from pollinate.node.model_files import ModelError, open_model

    try:
        files = open_model(args.model, cache_dir=cache_dir_from_cli(args.cache_dir))
    except ModelError as e:
        print(f"pollinate convert: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in files.path.rglob("*") if p.is_file())
    print(f"model:   {files.manifest.source} ({files.config.model_type})")
    print(f"blocks:  {files.num_blocks}, hidden size {files.hidden_size}")
    print(f"cache:   {files.path} ({size / 2**20:.0f} MiB)")
    return 0
