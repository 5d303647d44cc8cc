"""`rag tune`'s checkpoints: everything a resumed run needs to continue exactly (adapter
weights, optimizer, scheduler, step, data position, RNG), written atomically."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from rag_app.errors import TuneError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE = "state.pt"


def save_checkpoint(model: PeftModel, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    out: Path, recipe: dict[str, Any]) -> Path:
    """Adapter weights, optimizer, scheduler, step, data position and RNG, written to a
    .partial folder then renamed: a crash never leaves a half-written checkpoint."""
    target = out / CHECKPOINT
    tmp = out / (CHECKPOINT + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({
        "adapter": get_peft_model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "recipe": recipe,
        **state,
    }, tmp / STATE)
    old = out / (CHECKPOINT + ".old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(out: Path, recipe: dict[str, Any], steps: int) -> dict[str, Any]:
    """The last checkpoint in `out`, written with `recipe` (the options a resume must keep);
    a one-line TuneError for a missing, corrupt or incompatible one."""
    path = out / CHECKPOINT / STATE
    if not path.is_file():
        raise TuneError(f"{path}: no checkpoint to resume (run without --resume first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        step, written = int(ckpt["step"]), dict(ckpt["recipe"])
    except Exception as e:  # torch raises many kinds for a damaged file
        raise TuneError(f"{path}: corrupt checkpoint ({type(e).__name__}); delete "
                        f"{path.parent} to start again") from e
    changed = [k for k in recipe if written.get(k) != recipe[k]]
    if changed:
        raise TuneError(f"{path}: written with other {', '.join(changed)} "
                        f"({', '.join(f'{k}={written.get(k)}' for k in changed)}); resume with "
                        "the same options")
    if step >= steps:
        log.warning("checkpoint is at step %d of %d: nothing left to train", step, steps)
    return ckpt


def restore(ckpt: dict[str, Any], model: PeftModel, optimizer: Any, scheduler: Any) -> None:
    """Put a checkpoint's state back into a freshly built model, optimizer and scheduler."""
    set_peft_model_state_dict(model, ckpt["adapter"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["torch_rng"])
    if torch.cuda.is_available() and ckpt["cuda_rng"]:
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
