"""The bytes of a model file: safetensors tensors, the lowbit header, and a SHA-256 over both.

The safetensors metadata holds two keys: ``lowbit`` (the JSON header) and ``lowbit_sha256``, the
SHA-256 of the header text and of every tensor (name, dtype, shape and bytes, in name order). Reading
checks, in this order: the safetensors framing, the header's JSON and format version, the checksum,
then (in :mod:`lowbit.io`) every field. Any problem is a :class:`ModelFileError` saying what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ModelFileError

FORMAT_VERSION = 2
HEADER_KEY = "lowbit"
DIGEST_KEY = "lowbit_sha256"
MAX_HEADER = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def digest(header_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the header text and the tensors (name, dtype, shape, bytes; sorted by name)."""
    h = hashlib.sha256(b"lowbit-model\0")
    h.update(header_text.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def to_bytes(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """The file's bytes: the header as JSON (non-JSON values refused), the tensors, the checksum."""
    text = json.dumps(header, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return st_save(tensors, metadata={HEADER_KEY: text, DIGEST_KEY: digest(text, tensors)})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _framing(path: Path, data: bytes) -> dict[str, str]:
    """The safetensors metadata (string -> string), with the framing checked."""
    if len(data) < 8:
        raise ModelFileError(f"{path} is not a valid lowbit model file (corrupt or truncated: {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, MAX_HEADER):
        raise ModelFileError(f"{path} is not a valid lowbit model file (corrupt or truncated: header length {n} "
                             f"in a file of {len(data)} bytes)")
    try:
        st = json.loads(data[8:8 + n].decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{path} is not a valid lowbit model file (corrupt or truncated: {e})") from None
    meta = st.get("__metadata__") if isinstance(st, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ModelFileError(f"{path} is a safetensors file but not a lowbit model (no '{HEADER_KEY}' header)")
    if HEADER_KEY not in meta:
        raise ModelFileError(f"{path} is a safetensors file but not a lowbit model (no '{HEADER_KEY}' header)")
    extra = sorted(set(meta) - {HEADER_KEY, DIGEST_KEY})
    if extra:
        raise ModelFileError(f"{path}: unexpected metadata keys {[k[:30] for k in extra]} (corrupt file?)")
    return meta


def _version(path: Path, header: dict[str, Any]) -> None:
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelFileError(f"{path}: header field format_version must be an integer, got {str(version)[:30]!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written in lowbit format version {version} (lowbit {str(header.get('lowbit_version'))[:20]}); "
            f"this lowbit reads version {FORMAT_VERSION}: upgrade lowbit"
        )
    if version < 1:
        raise ModelFileError(f"{path}: format_version {version} is not a valid version")
    if version < FORMAT_VERSION:
        raise ModelFileError(f"{path} is in lowbit format version {version} (no checksum, graph run by generated "
                             f"code); this lowbit reads version {FORMAT_VERSION}: quantize the model again")


def read(path: str | Path, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a model file, framing, version and (with ``verify``) checksum checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    data = path.read_bytes()
    meta = _framing(path, data)
    text = meta[HEADER_KEY]
    try:
        header = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ModelFileError(f"{path}: corrupt lowbit header: {e}") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt lowbit header: not a JSON object")
    _version(path, header)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types on bad framing
        raise ModelFileError(f"{path} is not a valid lowbit model file (corrupt or truncated: {e})") from None
    if verify:
        want = meta.get(DIGEST_KEY)
        if not isinstance(want, str) or not _HEX64.match(want):
            raise ModelFileError(f"{path}: the SHA-256 checksum is missing or malformed (corrupt file?)")
        if digest(text, tensors) != want:
            raise ModelFileError(f"{path}: SHA-256 checksum mismatch: the file is corrupt or was modified "
                                 "after lowbit wrote it")
    return header, tensors


