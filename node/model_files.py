"""A model's files, converted once into per-block shards so a node reads only its blocks.

`open_model(source, cache_dir=...)` resolves a source (a local directory, a GGUF file, a hub
id the user named, or the embedded default SmolLM2-135M-Instruct), converts it into the cache
on first use and returns a `ModelFiles` handle. The layout of one converted model
(docs/models.md has the full description):

    <cache_dir>/models/<slug>-<key>/
        manifest.json            format version, source, fingerprint, shapes, file list
        config.json, generation_config.json, tokenizer files, chat template
        client.safetensors       embed_tokens, norm and (when untied) lm_head
        blocks/block_0000.safetensors ... one file per decoder block, keys local to the block

Conversion writes into a temporary sibling directory and renames it into place, so a killed
conversion never leaves a cache entry that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from pollinate.node.model_source import (
    ModelError,
    ModelNotFoundError,
    ModelSource,
    UnsupportedModelError,
    check_supported,
    resolve_source,
    source_state_dict,
)
from pollinate.node.span import SpanModule, check_span_range

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from pollinate.node.client_part import ClientPart

logger = logging.getLogger(__name__)

# Re-exported: callers catch these from the module they call.
__all__ = [
    "DEFAULT_CACHE_DIR", "Manifest", "ModelError", "ModelFiles", "ModelNotFoundError",
    "UnsupportedModelError", "open_model",
]

# Bumped whenever the on-disk layout changes; an entry with another version is rebuilt.
FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pollinate"
MANIFEST = "manifest.json"
CLIENT_FILE = "client.safetensors"
_BLOCK_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Source keys that belong to the client part, and their names in client.safetensors.
_CLIENT_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a converted cache entry holds; written last, so its presence means complete."""

    format_version: int  # FORMAT_VERSION at conversion time; others are rebuilt
    source: str  # what the user named, for humans reading the file
    fingerprint: str  # hash of the source's identity (paths, sizes, mtimes or hub id)
    model_type: str  # config.model_type, e.g. "llama"
    num_blocks: int  # config.num_hidden_layers
    hidden_size: int  # config.hidden_size
    tie_word_embeddings: bool  # when true, the LM head reuses embed_tokens.weight
    block_files: tuple[str, ...]  # relative paths, one per block, in block order
    created_at: float  # unix seconds, for humans and cache cleaning

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if len(self.block_files) != self.num_blocks:
            raise ValueError(f"{len(self.block_files)} block files for {self.num_blocks} blocks")

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["block_files"] = list(self.block_files)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["block_files"] = tuple(data["block_files"])
        return cls(**data)


class ModelFiles:
    """A converted model in the cache: config, per-block shards, the client part, tokenizer."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        self.manifest = manifest
        self.config: PretrainedConfig = AutoConfig.from_pretrained(self.path)

    def __repr__(self) -> str:
        return f"ModelFiles({str(self.path)!r}, blocks={self.num_blocks}, hidden={self.hidden_size})"

    @property
    def num_blocks(self) -> int:
        return self.manifest.num_blocks

    @property
    def hidden_size(self) -> int:
        return self.manifest.hidden_size

    def block_path(self, index: int) -> Path:
        check_span_range(index, index + 1, self.num_blocks)
        return self.path / self.manifest.block_files[index]

    def read_block(self, index: int) -> dict[str, torch.Tensor]:
        """One block's tensors, keyed as inside one decoder layer (`self_attn.q_proj.weight`)."""
        return _read_tensors(self.block_path(index))

    def load_span(
        self,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        quant: str = "none",
    ) -> SpanModule:
        """Blocks [start, end) as a SpanModule; reads only those blocks' files. `quant`: "none",
        or "int8"/"int4" to hold the blocks' Linear weights quantised (node/quant.py)."""
        from pollinate.node.quant import check_mode, quantize_span

        check_span_range(start, end, self.num_blocks)
        check_mode(quant)
        weights = {i: self.read_block(i) for i in range(start, end)}
        span = SpanModule.from_weights(
            self.config, start, end, weights,
            dtype=dtype, device=device, attn_implementation=attn_implementation,
        )
        return quantize_span(span, quant)

    def load_client_part(
        self, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> ClientPart:
        """Embeddings, final norm and LM head: what a client runs locally."""
        from pollinate.node.client_part import ClientPart

        return ClientPart.from_weights(
            self.config, _read_tensors(self.path / CLIENT_FILE), dtype=dtype, device=device
        )

    def tokenizer(self) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"model at {self.path} has no usable tokenizer: {e}") from e

    def generation_config(self):
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(self.path)
        except OSError:
            return GenerationConfig.from_model_config(self.config)

    def load_reference_model(
        self, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> PreTrainedModel:
        """The whole model as transformers builds it, from the cache: the local reference."""
        from transformers import AutoModelForCausalLM

        state = {f"model.layers.{i}.{k}": v for i in range(self.num_blocks) for k, v in self.read_block(i).items()}
        for key, value in _read_tensors(self.path / CLIENT_FILE).items():
            state["lm_head.weight" if key == "lm_head.weight" else f"model.{key}"] = value
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        if self.manifest.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        # Non-persistent buffers were created on meta: rebuild them (in fp32) for real.
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
        embed = model.model.embed_tokens
        if hasattr(embed, "scalar_embed_scale"):  # Gemma's scaled embedding
            embed.embed_scale = torch.tensor(embed.scalar_embed_scale)
        meta = [n for n, b in model.named_buffers() if b.is_meta]
        if meta:
            raise ModelError(f"reference model: buffers {meta} were not rebuilt after loading")
        model = model.to(device=device, dtype=dtype)
        model.generation_config = self.generation_config()
        return model.eval()


def open_model(
    source: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> ModelFiles:
    """Resolve `source`, convert it into `cache_dir` unless already there, return the handle.

    `source`: None or "smollm2" for the embedded default, a directory with config.json and
    weights, a .gguf file, or a hub id ("org/name", downloaded only because it was named).
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
    src = resolve_source(source)
    target = cache_root / "models" / f"{src.slug}-{src.fingerprint[:16]}"
    manifest = _read_manifest(target)
    if manifest is not None and manifest.fingerprint == src.fingerprint:
        logger.info("model %s: cached at %s", src.display, target)
        return ModelFiles(target, manifest)
    if manifest is not None:
        logger.info("model %s: cache entry %s is stale, rebuilding", src.display, target)
    _convert(src, target, show_progress=show_progress)
    manifest = _read_manifest(target)
    if manifest is None:
        raise ModelError(f"conversion of {src.display} left no manifest in {target}")
    return ModelFiles(target, manifest)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"cache file {path} is missing; delete its model directory to reconvert")
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _read_manifest(target: Path) -> Manifest | None:
    try:
        manifest = Manifest.from_json((target / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        logger.warning("ignoring unreadable manifest in %s: %s", target, e)
        return None
    return manifest if manifest.format_version == FORMAT_VERSION else None


def _convert(src: ModelSource, target: Path, *, show_progress: bool) -> None:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temps(target)
    # The temp dir is a sibling of the target so the final rename stays on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-{os.getpid()}-", dir=target.parent))
    try:
        t0 = time.monotonic()
        logger.info("converting %s into %s", src.display, target)
        config, tensors, extras = source_state_dict(src)
        check_supported(config)
        num_blocks = config.num_hidden_layers
        blocks: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(num_blocks)}
        client: dict[str, torch.Tensor] = {}
        for key in tensors.keys():
            match = _BLOCK_KEY.match(key)
            if match and int(match.group(1)) < num_blocks:
                blocks[int(match.group(1))][match.group(2)] = key
            elif key in _CLIENT_KEYS:
                client[_CLIENT_KEYS[key]] = key
            elif key.endswith("inv_freq"):
                continue  # recomputed from the config by the family's rotary class
            else:
                raise UnsupportedModelError(
                    f"{src.display}: unexpected tensor {key!r} for a {config.model_type} decoder"
                )
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied:
            client.pop("lm_head.weight", None)
        missing = [n for n in ("embed_tokens.weight", "norm.weight") if n not in client]
        missing += [f"block {i}" for i, b in blocks.items() if not b]
        if not tied and "lm_head.weight" not in client:
            missing.append("lm_head.weight")
        if missing:
            raise ModelError(f"{src.display}: weights missing for {', '.join(missing)}")

        (tmp / "blocks").mkdir()
        block_files = tuple(f"blocks/block_{i:04d}.safetensors" for i in range(num_blocks))
        bar = tqdm(total=num_blocks + 1, desc=f"converting {src.slug}", unit="shard", disable=not show_progress)
        with bar:
            save_file({k: tensors.get(v).contiguous() for k, v in client.items()}, str(tmp / CLIENT_FILE))
            bar.update(1)
            for i in range(num_blocks):
                shard = {k: tensors.get(v).contiguous() for k, v in blocks[i].items()}
                save_file(shard, str(tmp / block_files[i]), metadata={"block": str(i)})
                bar.update(1)

        config.save_pretrained(tmp)
        extras(tmp)  # tokenizer, chat template, generation config, as the source provides them
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            source=src.display,
            fingerprint=src.fingerprint,
            model_type=config.model_type,
            num_blocks=num_blocks,
            hidden_size=config.hidden_size,
            tie_word_embeddings=tied,
            block_files=block_files,
            created_at=time.time(),
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        done = _read_manifest(target)
        if done is not None and done.fingerprint == src.fingerprint:
            # Another process finished the same conversion first; readers may be using it.
            logger.info("%s was converted concurrently; keeping that copy", src.display)
            return
        if target.exists():
            shutil.rmtree(target)  # a stale or damaged entry is replaced whole
        os.rename(tmp, target)
        logger.info("converted %s: %d blocks in %.1f s", src.display, num_blocks, time.monotonic() - t0)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned_temps(target: Path) -> None:
    """Delete temp dirs that killed conversions of this entry left behind."""
    for tmp in target.parent.glob(f".tmp-{target.name}-*"):
        pid = tmp.name[len(f".tmp-{target.name}-"):].split("-", 1)[0]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        logger.info("removing abandoned conversion %s", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
