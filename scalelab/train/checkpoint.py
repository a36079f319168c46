"""Checkpoints: weights in safetensors, training state in a weights-only torch file.

Layout of one checkpoint folder::

    step_000500/
      model.safetensors   weights (a tied lm_head is stored once, as embed.weight)
      train_state.pt      optimizer, step, RNG and data-loader state (tensors and plain values only)
      meta.json           step, model config, and a sha256 manifest of the two files above

A checkpoint is written to a temporary folder, fsynced, then renamed into
place, and ``latest`` is replaced atomically after it: a crash mid-write leaves
the previous checkpoint as the latest complete one. Loading never unpickles
arbitrary objects (safetensors, and torch.load with weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT, GPTConfig

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; it is embed.weight
    return state


def save_weights(model: GPT, path: str | Path, metadata: dict | None = None) -> None:
    meta = {"config": json.dumps(asdict(model.config))}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file(model_state_for_saving(model), str(path), metadata=meta)


def load_weights_into(model: GPT, path: str | Path) -> None:
    state = read_safetensors(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ScalelabError(f"{path}: weights do not fit the model (missing {sorted(missing)}, unexpected {sorted(unexpected)})")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ScalelabError(f"weights file not found: {p}")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ScalelabError(f"{p} is not a readable safetensors file ({e})") from None


def save_checkpoint(
    ckpt_root: str | Path,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    step: int,
    loader_state: dict,
    extra: dict | None = None,
) -> Path:
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / MODEL_FILE, {"step": step})
    state = {
        "optimizer": optimizer.state_dict(),
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": json.dumps(loader_state),
        "extra": json.dumps(extra or {}),
    }
    torch.save(state, tmp / STATE_FILE)
    manifest = {f: _sha256(tmp / f) for f in (MODEL_FILE, STATE_FILE)}
    meta = {"step": step, "model_config": asdict(model.config), "manifest": manifest}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for f in (MODEL_FILE, STATE_FILE, META_FILE):
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / "latest", name + "\n")
    return final


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    root = Path(ckpt_root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def verify_checkpoint(path: str | Path) -> dict:
    p = Path(path)
    meta_path = p / META_FILE
    if not meta_path.is_file():
        raise ScalelabError(f"checkpoint {p} has no {META_FILE}: it is incomplete or not a checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise ScalelabError(f"checkpoint manifest {meta_path} is corrupt") from None
    for fname, digest in meta.get("manifest", {}).items():
        f = p / fname
        if not f.is_file():
            raise ScalelabError(f"checkpoint file missing: {f}")
        if _sha256(f) != digest:
            raise ScalelabError(f"checkpoint file is corrupt or truncated (checksum mismatch): {f}")
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A model from a checkpoint folder, or from a run folder (its latest checkpoint)."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        found = latest_checkpoint(p / "checkpoints")
        if found is None:
            raise ScalelabError(f"run folder {p} has no complete checkpoint")
        p = found
    if not p.exists():
        raise ScalelabError(f"checkpoint not found: {p}")
    meta = verify_checkpoint(p)
    model = GPT(GPTConfig(**meta["model_config"]))
    load_weights_into(model, p / MODEL_FILE)
    return model.to(device).eval()


def load_train_state(path: str | Path) -> dict:
    verify_checkpoint(path)
    try:
        state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file; all mean "unreadable"
        raise ScalelabError(f"cannot read {Path(path) / STATE_FILE}: {e}") from None
    state["loader"] = json.loads(state["loader"])
    state["extra"] = json.loads(state["extra"])
    return state
