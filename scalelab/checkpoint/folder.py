"""Checkpoints: weights in safetensors, training state in a weights-only torch file.

Layout of one checkpoint folder::

    step_000500/
      model.safetensors   weights (a tied lm_head is stored once, as embed.weight)
      train_state.pt      optimizer, step, RNG and data-loader state (tensors and plain values only)
      meta.json           step, model config, and a sha256 manifest of the two files above
      dcp/                sharded runs (FSDP2/TP) only: model and optimizer in torch.distributed.checkpoint
                          format, loadable on any mesh; train_state.pt then holds no optimizer state

A checkpoint is written to a temporary folder, every file and the folder are
fsynced, then it is renamed into place (and the parent folder fsynced), and
``latest`` is replaced atomically after it: a crash or power loss mid-write
leaves the previous checkpoint as the latest complete one. Loading checks the
manifest first (a checkpoint without one is refused) and never unpickles arbitrary
objects: safetensors; torch.load with weights_only=True; and, for the ``dcp/``
folder of a sharded run, a restricted unpickler for DCP's index and weights-only
loading of its values (scalelab.checkpoint.sharded). Folders whose names start with a
dot are unfinished writes or deletions and are never loaded; ``latest`` may only
name a ``step_NNNNNN`` folder beside it.

Trust boundary: the checks above mean a checkpoint cannot run code when loaded, but
its weights are whatever its author trained: load a checkpoint from someone else
only if you would accept what its model writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
import tomllib
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scalelab.errors import ScalelabError
from scalelab.model.gpt import GPT, GPTConfig

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
SHARDED_DIR = "dcp"


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
    _fsync_dir(path.parent)  # the rename itself is only durable once the folder entry is


def model_state_for_saving(model: GPT, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``state``: full weights gathered from a sharded model (default: model.state_dict())."""
    state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; it is embed.weight
    return state


def save_weights(model: GPT, path: str | Path, metadata: dict | None = None, state: dict | None = None) -> None:
    meta = {"config": json.dumps(asdict(model.config))}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file(model_state_for_saving(model, state), str(path), metadata=meta)


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
    model_state: dict | None = None,
    sharded_dir: str | Path | None = None,
) -> Path:
    """Write one checkpoint atomically. A sharded run passes its gathered full weights as ``model_state``
    and the DCP folder all ranks wrote as ``sharded_dir``; it is moved inside and covered by the manifest."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / MODEL_FILE, {"step": step}, state=model_state)
    state = {
        "optimizer": optimizer.state_dict() if sharded_dir is None else {},
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": json.dumps(loader_state),
        "extra": json.dumps(extra or {}),
    }
    torch.save(state, tmp / STATE_FILE)
    files = [MODEL_FILE, STATE_FILE]
    if sharded_dir is not None:
        os.replace(sharded_dir, tmp / SHARDED_DIR)
        files += sorted(f"{SHARDED_DIR}/{f.name}" for f in (tmp / SHARDED_DIR).iterdir())
    manifest = {f: _sha256(tmp / f) for f in files}
    meta = {"step": step, "model_config": asdict(model.config), "manifest": manifest}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for f in (*files, META_FILE):
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    if sharded_dir is not None:
        _fsync_dir(tmp / SHARDED_DIR)
    _fsync_dir(tmp)
    _test_hang_hook(step)
    if final.exists():
        # Rewriting a step (after a rollback) must never leave a half-deleted folder under its real name.
        _remove_dir(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / "latest", name + "\n")
    return final


def _test_hang_hook(step: int) -> None:
    """Crash-safety tests kill a run here, deterministically, with every file written but not yet renamed.

    ``SCALELAB_TEST_HANG_IN_CHECKPOINT=STEP:MARKER`` creates MARKER and blocks when saving STEP.
    """
    spec = os.environ.get("SCALELAB_TEST_HANG_IN_CHECKPOINT", "")
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if at.isdigit() and int(at) == step:
        Path(marker).write_text(str(os.getpid()))
        while True:
            time.sleep(1)


def _step_of(name: str) -> int | None:
    m = re.fullmatch(r"step_(\d+)", name)
    return int(m.group(1)) if m else None


def _pointer_target(root: Path) -> Path | None:
    """The folder ``latest`` names: a plain step_NNNNNN name beside it, never a path elsewhere."""
    name = (root / "latest").read_text(encoding="utf-8", errors="replace").strip()
    if _step_of(name) is None:  # absolute, ../, a sub-folder or anything else: not a checkpoint of this run
        return None
    return root / name


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first. A folder only gets its final name once it is complete."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p.name)) is not None and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    step = _step_of(Path(path).name)
    if step is None:
        raise ScalelabError(f"{path} is not a checkpoint folder (expected a name like step_000500)")
    return step


def _remove_dir(path: Path) -> None:
    # Rename first: a crash in the middle of rmtree must not leave a partial folder under a loadable name.
    doomed = path.with_name(f".{path.name}.del")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed)


# what a run writes before its config.toml: a run that died while preparing its data holds only these
_EARLY_RUN_ENTRIES = {"tokenizer", "data", "world.json", "checkpoints", "metrics.jsonl", "tb"}


def _looks_like_run(path: Path) -> bool:
    """A folder scalelab wrote: a config with a [run] table, a checkpoints/ folder with checkpoints, or
    nothing but what a run writes first."""
    if all(child.name in _EARLY_RUN_ENTRIES for child in path.iterdir()):
        return True
    try:
        if "run" in tomllib.loads((path / "config.toml").read_text(encoding="utf-8")):
            return True
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass
    found = path / "checkpoints"
    return found.is_dir() and ((found / "latest").is_file() or bool(list_checkpoints(found)))


def remove_run_folder(path: str | Path) -> None:
    """``--overwrite``: delete a run folder, and nothing that merely sits where one was asked for.

    Refused: the filesystem root, the home folder and its parents, the current folder and its
    parents, a symbolic link, and any non-empty folder that does not look like a run."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    resolved, home, cwd = p.resolve(), Path.home().resolve(), Path.cwd().resolve()
    what = ("the filesystem root" if resolved == Path(resolved.anchor) else
            "your home folder" if resolved == home else
            "a parent of your home folder" if resolved in home.parents else
            "the current folder" if resolved == cwd else
            "a parent of the current folder" if resolved in cwd.parents else
            "a symbolic link" if p.is_symlink() else
            "not a folder" if not p.is_dir() else None)
    if what is None and any(p.iterdir()) and not _looks_like_run(p):
        what = "not a run folder (no config.toml with a [run] table, no checkpoints/)"
    if what is not None:
        raise ScalelabError(f"--overwrite refuses to delete {p}: it is {what}; give run.out_dir a folder of its own")
    _remove_dir(p)


def prune_checkpoints(ckpt_root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all); the one ``latest`` names always stays."""
    root = Path(ckpt_root)
    for stale in root.glob(".step_*.del"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return []
    current = latest_checkpoint(root)
    doomed = [p for p in list_checkpoints(root)[:-keep] if p != current]
    for p in doomed:
        _remove_dir(p)
    return doomed


def discard_checkpoints_after(ckpt_root: str | Path, step: int) -> Path:
    """Make the checkpoint at ``step`` the latest and delete newer ones: they belong to an abandoned history.

    ``latest`` moves first, so a crash part-way still resumes from ``step``.
    """
    root = Path(ckpt_root)
    target = root / f"step_{step:06d}"
    if not (target / META_FILE).is_file():
        raise ScalelabError(f"checkpoint {target} does not exist")
    _write_text_atomic(root / "latest", target.name + "\n")
    for p in list_checkpoints(root):
        if checkpoint_step(p) > step:
            _remove_dir(p)
    return target


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names; without a usable pointer, the newest complete checkpoint folder."""
    root = Path(ckpt_root)
    if (root / "latest").is_file():
        path = _pointer_target(root)
        if path is not None and (path / META_FILE).is_file():
            return path
    found = list_checkpoints(root)
    return found[-1] if found else None


def verify_checkpoint(path: str | Path) -> dict:
    p = Path(path)
    meta_path = p / META_FILE
    if not meta_path.is_file():
        raise ScalelabError(f"checkpoint {p} has no {META_FILE}: it is incomplete or not a checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ScalelabError(f"checkpoint manifest {meta_path} is corrupt") from None
    manifest = meta.get("manifest") if isinstance(meta, dict) else None
    if not isinstance(manifest, dict) or MODEL_FILE not in manifest:
        raise ScalelabError(f"checkpoint {p} has no manifest covering {MODEL_FILE} in {META_FILE}: "
                            "it cannot be verified, and is refused")
    for fname, digest in manifest.items():
        parts = Path(fname).parts
        if Path(fname).is_absolute() or ".." in parts or not isinstance(digest, str):
            raise ScalelabError(f"checkpoint manifest {meta_path} names a file outside the checkpoint: {fname}")
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
    model = GPT(model_config_from(meta.get("model_config"), p / META_FILE))
    load_weights_into(model, p / MODEL_FILE)
    return model.to(device).eval()


def model_config_from(table, where: Path) -> GPTConfig:
    """A GPTConfig from a checkpoint's saved ``model_config``; unknown or missing keys are a one-line error."""
    if not isinstance(table, dict):
        raise ScalelabError(f"{where}: 'model_config' is missing or not a table")
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ScalelabError(f"{where}: unknown model_config keys {', '.join(unknown)} "
                            f"(valid: {', '.join(sorted(known))}); was it written by a newer scalelab?")
    try:
        return GPTConfig(**table)
    except (TypeError, ValueError) as e:
        raise ScalelabError(f"{where}: invalid model_config ({e})") from None


def load_train_state(path: str | Path) -> dict:
    try:
        verify_checkpoint(path)
    except ScalelabError as e:
        older = [p.name for p in list_checkpoints(Path(path).parent) if p.name != Path(path).name]
        if not older:
            raise
        pointer = Path(path).parent / "latest"
        raise ScalelabError(
            f"{e}; older checkpoints: {', '.join(older[-3:])} "
            f"(write one of their names into {pointer} to resume from it)"
        ) from None
    try:
        state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ScalelabError(
            f"cannot read {Path(path) / STATE_FILE}: it holds objects other than tensors and plain values, "
            "and is refused rather than unpickled"
        ) from None
    except Exception as e:  # torch raises several types for a bad file; all mean "unreadable"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ScalelabError(f"cannot read {Path(path) / STATE_FILE}: {first_line}") from None
    state["loader"] = json.loads(state["loader"])
    state["extra"] = json.loads(state["extra"])
    return state
