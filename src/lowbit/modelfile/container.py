"""The bytes of a model file: safetensors tensors, the lowbit header, and a SHA-256 over both.

The safetensors metadata holds three keys (format version 3):

- ``lowbit``: a short JSON object ``{"format_version": 3, "lowbit_version": ..., "encoding": "zlib+base64"}``
  that any reader can parse (an older lowbit then says the file is newer than it and to upgrade); both
  versions must equal the header's own (the checksum covers the header, so this covers the stub);
- ``lowbit_z``: the JSON header (program, modules, meta), zlib-compressed and base64-encoded. The header
  repeats the same field names for every layer, so it shrinks 6-10x; on a small network (ResNet-20: 272k
  weights) it would otherwise be 7% of an int8 file and 12% of a 4.6-bit one;
- ``lowbit_sha256``: the SHA-256 of the header text (uncompressed) and of every tensor (name, dtype,
  shape and bytes, in name order). The base64 text must be canonical (what encoding its bytes gives), so
  no changed character goes unnoticed.

Format version 2 (lowbit before this change: the JSON header itself under ``lowbit``) is still read.
Reading checks, in this order: the safetensors framing, the header's encoding, JSON and format version,
the checksum, then (in :mod:`lowbit.io`) every field. Any problem is a :class:`ModelFileError` saying
what is wrong; decompression stops at :data:`MAX_HEADER` bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ModelFileError

FORMAT_VERSION = 3
#: The oldest format version this lowbit reads (2: the header uncompressed under ``lowbit``).
OLDEST_VERSION = 2
HEADER_KEY = "lowbit"
BODY_KEY = "lowbit_z"
DIGEST_KEY = "lowbit_sha256"
ENCODING = "zlib+base64"
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
    """The file's bytes: the header as compressed JSON (non-JSON values refused), the tensors, the
    checksum."""
    text = json.dumps(header, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    stub = json.dumps({"format_version": header.get("format_version", FORMAT_VERSION),
                       "lowbit_version": header.get("lowbit_version"), "encoding": ENCODING}, separators=(",", ":"))
    body = base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")
    return st_save(tensors, metadata={HEADER_KEY: stub, BODY_KEY: body, DIGEST_KEY: digest(text, tensors)})


def _inflate(path: Path, body: str) -> str:
    """The header text of a version-3 file from its ``lowbit_z`` value (at most MAX_HEADER bytes)."""
    try:
        raw = base64.b64decode(body.encode("ascii"), validate=True)
        if base64.b64encode(raw).decode("ascii") != body:  # e.g. changed padding bits of the last character
            raise ModelFileError(f"{path}: corrupt lowbit header (the compressed header is not canonical base64)")
        d = zlib.decompressobj()
        out = d.decompress(raw, MAX_HEADER + 1)
        if len(out) > MAX_HEADER:
            raise ModelFileError(f"{path}: the compressed header expands past {MAX_HEADER >> 20} MiB (corrupt file?)")
        if not d.eof or d.unused_data:
            raise ModelFileError(f"{path}: corrupt lowbit header (the compressed header is truncated or has "
                                 "trailing bytes)")
        return out.decode("utf-8")
    except (UnicodeError, binascii.Error, zlib.error) as e:
        raise ModelFileError(f"{path}: corrupt lowbit header (cannot decompress it: {e})") from None


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
    extra = sorted(set(meta) - {HEADER_KEY, BODY_KEY, DIGEST_KEY})
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
    if version < OLDEST_VERSION:
        raise ModelFileError(f"{path} is in lowbit format version {version} (no checksum, graph run by generated "
                             f"code); this lowbit reads versions {OLDEST_VERSION}-{FORMAT_VERSION}: quantize the model "
                             "again")


def _json_object(path: Path, text: str) -> dict[str, Any]:
    try:
        header = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ModelFileError(f"{path}: corrupt lowbit header: {e}") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt lowbit header: not a JSON object")
    return header


def _header(path: Path, meta: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(header text, header) from the safetensors metadata: format 3 unpacked, format 2 as stored; the
    version checked."""
    text = meta[HEADER_KEY]
    header = _json_object(path, text)
    _version(path, header)
    if header["format_version"] < 3:
        if BODY_KEY in meta:
            raise ModelFileError(f"{path}: unexpected metadata key '{BODY_KEY}' in a format-version-2 file "
                                 "(corrupt file?)")
        return text, header
    if set(header) != {"format_version", "lowbit_version", "encoding"} or header["encoding"] != ENCODING \
            or BODY_KEY not in meta:
        raise ModelFileError(f"{path}: corrupt lowbit header (expected {{format_version, lowbit_version, "
                             f"encoding: {ENCODING!r}}} and a '{BODY_KEY}' entry)")
    stub, text = header, _inflate(path, meta[BODY_KEY])
    header = _json_object(path, text)
    for key in ("format_version", "lowbit_version"):  # the checksum covers the header, not the stub: compare
        if header.get(key) != stub[key]:
            raise ModelFileError(f"{path}: corrupt lowbit header ({key} {str(header.get(key))[:20]} inside, "
                                 f"{str(stub[key])[:20]} outside)")
    return text, header


def read(path: str | Path, verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a model file, framing, version and (with ``verify``) checksum checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    data = path.read_bytes()
    meta = _framing(path, data)
    text, header = _header(path, meta)
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


