"""The docs name only what exists: every command-line flag, every function called in backticks
and every repository path that a page under docs/, a README or a module docstring names must
be in the code.

A doc that names a flag nobody defines (renamed, never wired) or a function that was renamed
sends its reader looking for something that is not there; this fails instead. Names that
belong to other tools (pip, docker, torch, ...) are listed below, each with where it is from.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("cli", "client", "compression", "coordinator", "node", "protocol", "benchmarks", "tests", "examples")

# Flags of other tools that the docs name: pip (--no-deps, --only-binary, --platform,
# --python-version), docker compose (--build), argparse's own --help.
FOREIGN_FLAGS = {"--no-deps", "--only-binary", "--platform", "--python-version", "--build", "--help"}
# Calls into other libraries that the docs name: torch (named_modules, parameters, to),
# protobuf (ByteSize), the standard library (gc.freeze, math.prod, hashlib.sha256).
# Calls of libraries the docs name (torch, protobuf, hashlib, transformers, torchao).
FOREIGN_CALLS = {"named_modules", "parameters", "to", "ByteSize", "freeze", "prod", "sha256", "DynamicCache",
                 "IntxWeightOnlyConfig", "Int4WeightOnlyConfig"}

FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
CALL = re.compile(r"`+([A-Za-z_][\w.]*)\((?:[^`()]*)\)`+")
PATH = re.compile(r"(?<![\w/.-])((?:cli|client|compression|coordinator|node|protocol|benchmarks|tests|docs|examples)"
                  r"/(?:[\w-]+/)*[\w-]+\.(?:py|md|proto|json|jsonl))\b")


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py") if "_pb2" not in p.name)


@cache
def _trees() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), str(p)) for p in _sources()}


@cache
def defined_flags() -> frozenset[str]:
    """Every option string in the repository's code (and --no-X of each): what its argparse
    parsers add, also in loops (`for name in ("--model", ...)`), and what it passes to them."""
    flags = set()
    for tree in _trees().values():
        flags |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                  and FLAG.fullmatch(n.value)}
    return frozenset(flags | {"--no-" + f[2:] for f in flags})


@cache
def defined_names() -> frozenset[str]:
    """Every function, method and class defined in the repository."""
    names = set()
    for tree in _trees().values():
        names |= {n.name for n in ast.walk(tree)
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return frozenset(names)


def documents() -> list[tuple[str, str]]:
    """(where, text): the docs pages, the READMEs and every module docstring."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(p for d in SOURCE_DIRS if (p := ROOT / d / "README.md").exists())]
    out = [(str(p.relative_to(ROOT)), p.read_text()) for p in pages]
    for path, tree in _trees().items():
        doc = ast.get_docstring(tree)
        if doc:
            out.append((f"{path.relative_to(ROOT)} (docstring)", doc))
    return out


def test_every_flag_the_docs_name_is_defined():
    missing = sorted({(where, flag) for where, text in documents() for flag in FLAG.findall(text)
                      if flag not in defined_flags() and flag not in FOREIGN_FLAGS})
    assert not missing, f"flags named in docs that no parser defines: {missing}"


def test_every_function_the_docs_call_is_defined():
    missing = sorted({(where, call) for where, text in documents() for call in CALL.findall(text)
                      if call.split(".")[-1] not in defined_names() and call.split(".")[-1] not in FOREIGN_CALLS})
    assert not missing, f"functions named in docs that are defined nowhere: {missing}"


def test_every_repository_path_the_docs_name_exists():
    missing = sorted({(where, path) for where, text in documents() for path in PATH.findall(text)
                      if not (ROOT / path).exists() and not (ROOT / "protocol" / path).exists()})
    assert not missing, f"paths named in docs that do not exist: {missing}"


def test_the_check_sees_a_stale_name():
    # the patterns find what a stale doc would say, so the tests above can fail
    flag = "--no" + "t-a-flag"  # not a constant here, or the check would count it as defined
    text = f"run `pollinate node {flag}` and call `node.rounds.load_state()` from node/nothing.py"
    assert FLAG.findall(text) == [flag] and flag not in defined_flags()
    assert CALL.findall(text) == ["node.rounds.load_state"] and "load_state" not in defined_names()
    assert PATH.findall(text) == ["node/nothing.py"]
    assert "--coordinator" in defined_flags() and "run_torch" in defined_names()
