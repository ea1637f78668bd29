"""Content hashes that tell a valid cache from a stale one (docs/design.md invariant 5).

All three return a sha256 hex digest that depends only on content, never on object
identity, file modification times, dict order or the process that computed it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

_READ_BLOCK = 1 << 20


def _header(*fields: Any) -> bytes:
    # A length-delimited header per item, so ("ab", "c") and ("a", "bc") cannot collide.
    text = json.dumps(fields, separators=(",", ":"))
    return len(text).to_bytes(8, "little") + text.encode()


def fingerprint_module(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer: name, dtype, shape and raw bytes, in name order.

    Non-persistent buffers (absent from `state_dict`) are included too: they still shape
    the module's output. Raw bytes are taken through a uint8 view, so bfloat16 (which
    numpy cannot represent) hashes exactly, NaN payloads and -0.0 included.
    """
    tensors = dict(module.state_dict(keep_vars=False))
    for name, buf in module.named_buffers():
        tensors.setdefault(name, buf)
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(_header(name, str(t.dtype), list(t.shape)))
        raw = t.cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


def fingerprint_file_tree(path: str | os.PathLike[str]) -> str:
    """Hash of a file or a directory tree: relative POSIX paths, sizes and bytes, sorted.

    Empty directories and modification times do not count; symlinks are followed.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"cannot fingerprint {root}: it does not exist")
    if root.is_file():
        files = [root]
    else:
        files = sorted(
            (p for p in root.rglob("*") if p.is_file()),
            key=lambda p: p.relative_to(root).as_posix(),
        )
    h = hashlib.sha256()
    for file in files:
        rel = file.name if file == root else file.relative_to(root).as_posix()
        h.update(_header(rel, file.stat().st_size))
        with file.open("rb") as f:
            while block := f.read(_READ_BLOCK):
                h.update(block)
    return h.hexdigest()


def fingerprint_dict(d: dict[str, Any]) -> str:
    """Hash of a JSON-able dict in canonical form (sorted keys, no whitespace, no NaN)."""
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
