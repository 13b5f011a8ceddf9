"""Conv prefixes to bytes and back: torch.save of a plain state dict, loaded with weights_only=True."""

from __future__ import annotations

import io

import torch


def prefix_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({name: tensor.contiguous().cpu() for name, tensor in state.items()}, buffer)
    return buffer.getvalue()


def prefix_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Never unpickles code: weights_only=True refuses anything but tensors and plain containers.

    Whatever torch refuses (code, garbage, truncation) is a ValueError, so a caller skips that donor.
    """
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, EOFError, RuntimeError: all mean "not a weights file"
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"not a weights-only checkpoint ({type(error).__name__}: {first_line})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("checkpoint is not a state dict of tensors")
    return state
