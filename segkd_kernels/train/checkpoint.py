"""Checkpoints that survive crashes: written atomically, verified on load.

File layout: one header line `SEGKD-CKPT 1 <sha256 of the payload> <payload bytes>\n`, then the
payload written by `torch.save`. A truncated or corrupted file fails the length or digest check and is
refused with a clear error (torch.load alone does not notice a flipped byte inside a tensor).

Saving writes `<name>.tmp`, fsyncs it, moves the current `last.pt` to `prev.pt`, then renames the new
file to `last.pt` (os.replace is atomic on POSIX), so at every moment a complete checkpoint exists
under one of the two names, and a crash while writing leaves the previous one untouched.
"""

from __future__ import annotations

import hashlib
import io
import os
import random

import numpy as np
import torch

MAGIC = b"SEGKD-CKPT"
VERSION = 1
LAST, PREV = "last.pt", "prev.pt"


class CheckpointError(RuntimeError):
    """The file is not a complete segkd checkpoint."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: str, *, keep_previous: bool = True) -> str:
    """Write `state` to `path` atomically (temp file + fsync + rename). Returns the path."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    header = b"%s %d %s %d\n" % (MAGIC, VERSION, hashlib.sha256(payload).hexdigest().encode(), len(payload))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and os.path.exists(path):
        os.replace(path, os.path.join(directory, PREV) if os.path.basename(path) == LAST else path + ".prev")
    os.replace(tmp, path)
    try:  # make the renames themselves durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The state saved by save_checkpoint, or CheckpointError saying what is wrong with the file."""
    if os.path.isdir(path):
        hint = os.path.join(path, LAST)
        raise CheckpointError(f"checkpoint {path!r} is a folder, not a checkpoint file"
                              + (f"; did you mean {hint}?" if os.path.isfile(hint) else
                                 f"; a run folder holds its checkpoint as {LAST}"))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        header = f.readline(256)
        payload = f.read()
    parts = header.split()
    bad_header = CheckpointError(f"checkpoint {path!r} is not a segkd checkpoint (bad header); it may be truncated "
                                 f"or written by another program")
    if len(parts) != 4 or parts[0] != MAGIC:
        raise bad_header
    # the numeric fields are checked before use: a damaged header must not surface as a ValueError
    if not (parts[1].isdigit() and parts[3].isdigit() and len(parts[2]) == 64
            and all(c in b"0123456789abcdef" for c in parts[2])):
        raise CheckpointError(f"checkpoint {path!r} has a damaged header {header[:120]!r}: expected "
                              f"'{MAGIC.decode()} <version> <sha256 hex> <payload bytes>'")
    if int(parts[1]) != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {parts[1].decode()}, expected {VERSION}")
    expected_len = int(parts[3])
    if len(payload) != expected_len:
        raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt: {len(payload)} bytes of payload, "
                              f"expected {expected_len}")
    if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its checksum does not match")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


def find_resume(out_dir: str) -> str | None:
    """The checkpoint `--resume` continues from: last.pt, or prev.pt when a crash hit between renames."""
    for name in (LAST, PREV):
        p = os.path.join(out_dir, name)
        if os.path.exists(p):
            return p
    return None


def describe_fallback(out_dir: str, failed: str) -> str:
    """A hint naming the previous checkpoint when the latest one is unusable."""
    prev = os.path.join(out_dir, PREV)
    if os.path.abspath(prev) != os.path.abspath(failed) and os.path.exists(prev):
        try:
            step = load_checkpoint(prev).get("step")
            return f"; the previous checkpoint {prev!r} (step {step}) is intact: resume from it with --resume-from {prev}"
        except CheckpointError:
            return f"; the previous checkpoint {prev!r} is unusable too"
    return ""
