"""Shrink a LoRA adapter to a size budget by truncating each update's SVD.

A LoRA module adds `scale * B @ A` to a weight. Its best approximation of a lower rank (in
the Frobenius norm) is the truncated SVD of that product, so the whole adapter is shrunk
by keeping, across all modules, the singular values that buy the most of the update's
squared norm per byte, until the budget is spent. Each module keeps its own rank (peft's
`rank_pattern`), with `lora_alpha` equal to it so the stored factors carry the scale.
"""

from __future__ import annotations

import heapq
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rag_app.adapter import CONFIG, WEIGHTS

_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class ShrinkReport:
    bytes_before: int
    bytes_after: int
    rank_before: int
    ranks: dict[str, int]  # module -> kept rank
    kept_energy: float  # share of the updates' squared Frobenius norm kept


def shrink_adapter(src: Path, dst: Path, max_bytes: int,
                   dtype: torch.dtype = torch.bfloat16) -> ShrinkReport:
    """Write to `dst` the adapter of `src` truncated so its weights file, in `dtype`, holds
    at most `max_bytes` (every module keeps rank 1 at least). `dst` may be `src`."""
    config = json.loads((src / CONFIG).read_text(encoding="utf-8"))
    weights = load_file(src / WEIGHTS)
    rank = int(config["r"])
    modules = sorted(k[:-len(_A)] for k in weights if k.endswith(_A))
    if not modules:
        raise ValueError(f"{src / WEIGHTS} holds no LoRA weights")
    scale = float(config["lora_alpha"]) / rank  # alpha/rank patterns are not expected here
    factors = {}
    for m in modules:
        a, b = weights[m + _A].double(), weights[m + _B].double()
        # SVD of B @ A via the small factors: QR of B and of A^T, then an r x r SVD.
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(scale * rb @ ra.T)
        factors[m] = (qb @ u, s, vh @ qa.T)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    cost = {m: (weights[m + _A].shape[1] + weights[m + _B].shape[0]) * itemsize
            for m in modules}
    before = (src / WEIGHTS).stat().st_size
    # the file's header (names, shapes) is about the source's: its size less its tensors
    header = before - sum(t.numel() * t.element_size() for t in weights.values()) + 1024
    ranks = dict.fromkeys(modules, 1)
    spent = header + sum(cost.values())
    heap = [(-(factors[m][1][1].item() ** 2) / cost[m], m) for m in modules if rank > 1]
    heapq.heapify(heap)
    while heap:
        _, m = heapq.heappop(heap)
        if spent + cost[m] > max_bytes:
            continue
        ranks[m] += 1
        spent += cost[m]
        if ranks[m] < rank:
            s = factors[m][1]
            heapq.heappush(heap, (-(s[ranks[m]].item() ** 2) / cost[m], m))
    out, total, kept = {}, 0.0, 0.0
    for m in modules:
        u, s, vh = factors[m]
        k = ranks[m]
        root = s[:k].sqrt()
        out[m + _B] = (u[:, :k] * root).to(dtype).contiguous()
        out[m + _A] = (root[:, None] * vh[:k]).to(dtype).contiguous()
        total += float((s ** 2).sum())
        kept += float((s[:k] ** 2).sum())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / WEIGHTS), metadata={"format": "pt"})
    names = {re.escape(_module_name(m)): k for m, k in ranks.items()}
    config.update(r=max(names.values()), lora_alpha=max(names.values()),
                  rank_pattern=names, alpha_pattern=names)
    (dst / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return ShrinkReport(before, (dst / WEIGHTS).stat().st_size, rank, names,
                        kept / total if total else 1.0)


def _module_name(key: str) -> str:
    """peft's stored key "base_model.model.model.layers.0.mlp.up_proj" -> the module's
    name in the model, "model.layers.0.mlp.up_proj" (what rank_pattern matches)."""
    return key.removeprefix("base_model.model.")
