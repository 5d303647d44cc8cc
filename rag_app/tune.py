"""`rag tune`: LoRA fine-tuning of the local model on qa-pool examples built with the
chain's own prompt (rag_app/tune_data.py), with exact checkpoints and resumption."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm

from rag_app.device import resolve_device
from rag_app.settings import Settings
from rag_app.tune_checkpoint import load_checkpoint, restore, save_checkpoint
from rag_app.tune_data import IGNORE, Encoded, ExampleSet, encode_fitting, load_pool, split
from rag_app.tune_shrink import shrink_adapter

log = logging.getLogger(__name__)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# What must not change between a run and its --resume: the data and the recipe.
SAME_ON_RESUME = ("seed", "examples", "accumulate", "lr", "max_tokens", "rank", "words",
                  "distractors")


@dataclass
class TuneOptions:
    data: Path
    out: Path
    steps: int = 300
    max_minutes: float | None = None
    until: int | None = None  # stop after this step, on the schedule of `steps`
    examples: int | None = None  # distinct training questions (None: all)
    threads: int | None = 1
    seed: int = 0
    resume: bool = False
    accumulate: int = 8
    lr: float = 2e-4
    warmup: int = 10
    rank: int = 16
    max_tokens: int = 512
    words: tuple[int, int] = (60, 90)  # passage window sizes
    distractors: tuple[int, int] = (2, 3)  # passages without the answer beside the gold one
    checkpoint_every: int = 10
    val_examples: int = 200
    max_mb: float | None = None  # shrink the saved adapter to this size (tune_shrink)
    lora_b_std: float = 0.0  # > 0: LoRA B starts random (tests: a change from step 0)
    progress: bool = True


@dataclass
class TuneReport:
    out: Path
    step: int
    steps: int
    examples_seen: int
    train_s: float
    s_per_step: float | None
    val_loss_before: float | None
    val_loss_after: float | None
    interrupted: bool = False
    timed_out: bool = False
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def load_base(settings: Settings) -> tuple[Any, Any, str]:
    """The base model as LocalLM loads it (GGUF -> safetensors cache), float32 master
    weights, without any llm.adapter: the adapter is what is being trained."""
    from rag_app.llm import _load

    device = resolve_device(settings.llm.device)
    llm = settings.llm.model_copy(update={"adapter": None})
    model, tokenizer = _load(llm, device, torch.float32)
    return model, tokenizer, device


def add_lora(model: Any, opts: TuneOptions) -> PeftModel:
    """Wrap the base model with trainable LoRA matrices on the seven projections."""
    config = LoraConfig(r=opts.rank, lora_alpha=2 * opts.rank, lora_dropout=0.05,
                        target_modules=TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(opts.seed)
    peft_model = get_peft_model(model, config)
    if opts.lora_b_std > 0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, opts.lora_b_std)
    return peft_model


def autocast(device: str) -> AbstractContextManager[Any]:
    """bf16 autocast over float32 master weights where bf16 is native (CUDA GPUs that
    support it, CPUs with AVX-512 BF16 / AMX); elsewhere plain float32, since emulated bf16
    is slower (measured on an AVX2 CPU: 10x for forward + backward)."""
    kind = device.split(":")[0]
    if kind == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if kind == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def example_loss(model: Any, enc: Encoded, device: str) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (the labels not masked). Logits are only
    computed where there is a loss: the LM head over the whole prompt would cost a fifth
    of the step."""
    answer_at = int((enc.labels != IGNORE).nonzero()[0])
    keep = len(enc.input_ids) - answer_at + 1  # positions answer_at-1 .. T-1
    with autocast(device):
        logits = model(input_ids=enc.input_ids[None].to(device),
                       logits_to_keep=keep).logits[0, :-1]  # (answer tokens, vocab)
    targets = enc.input_ids[answer_at:].to(device)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def validation_loss(model: Any, tokenizer: Any, val: ExampleSet | None, opts: TuneOptions,
                    device: str) -> float | None:
    """Mean answer loss over the held-out examples (dropout off)."""
    if val is None:
        return None
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for i in tqdm(range(len(val)), desc="validation", leave=False,
                      disable=not opts.progress, file=sys.stderr):
            total += float(example_loss(model, encode_fitting(tokenizer, val, i,
                                                              opts.max_tokens), device))
    model.train(was_training)
    return total / len(val)


def schedule(opts: TuneOptions) -> Any:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    def factor(step: int) -> float:
        if step < opts.warmup:
            return (step + 1) / opts.warmup
        progress = min(1.0, (step - opts.warmup) / max(1, opts.steps - opts.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _recipe(opts: TuneOptions) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in SAME_ON_RESUME}


def tune(settings: Settings, opts: TuneOptions) -> TuneReport:
    """Train a LoRA adapter for settings.llm.model; write it to `opts.out` (peft's
    save_pretrained: adapter_config.json + adapter_model.safetensors) with a report.json."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    questions, contexts = load_pool(opts.data)
    train_set, val = split(questions, contexts, opts.seed, opts.val_examples, opts.words,
                           opts.distractors)
    if opts.examples:
        train_set.questions = train_set.questions[:opts.examples]
    ckpt = load_checkpoint(opts.out, _recipe(opts), opts.steps) if opts.resume else None
    opts.out.mkdir(parents=True, exist_ok=True)
    base, tokenizer, device = load_base(settings)
    model = add_lora(base, opts)
    log.info("training %d LoRA parameters on %s", sum(
        p.numel() for p in model.parameters() if p.requires_grad), device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=opts.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(opts))
    state = {"step": 0, "position": 0, "train_s": 0.0, "losses": [],
             "val_loss_before": None}
    if ckpt is not None:
        restore(ckpt, model, optimizer, scheduler)
        state = {k: ckpt[k] for k in state}
        log.info("resuming at step %d (example %d)", state["step"], state["position"])
    else:
        state["val_loss_before"] = validation_loss(model, tokenizer, val, opts, device)
    report = _train_loop(model, tokenizer, train_set, optimizer, scheduler, state, opts,
                         device)
    model.save_pretrained(opts.out)
    if opts.max_mb:
        shrunk = shrink_adapter(opts.out, opts.out, int(opts.max_mb * 1e6))
        log.info("adapter shrunk to %.1f MB, keeping %.1f%% of its update",
                 shrunk.bytes_after / 1e6, 100 * shrunk.kept_energy)
    report.val_loss_before = state["val_loss_before"]
    if not report.interrupted:
        report.val_loss_after = validation_loss(model, tokenizer, val, opts, device)
    (opts.out / "report.json").write_text(json.dumps(report.as_dict(), indent=1))
    return report


def _optimizer_step(model: PeftModel, tokenizer: Any, examples: ExampleSet, optimizer: Any,
                    state: dict[str, Any], opts: TuneOptions, device: str) -> float:
    """One optimizer step over `opts.accumulate` examples (batch 1 each); the mean loss."""
    total = 0.0
    for i in range(opts.accumulate):
        enc = encode_fitting(tokenizer, examples, state["position"] + i, opts.max_tokens)
        loss = example_loss(model, enc, device)
        (loss / opts.accumulate).backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / opts.accumulate


def _train_loop(model: PeftModel, tokenizer: Any, examples: ExampleSet, optimizer: Any,
                scheduler: Any, state: dict[str, Any], opts: TuneOptions, device: str
                ) -> TuneReport:
    """Optimizer steps until opts.steps (or opts.until), opts.max_minutes or Ctrl-C;
    checkpoints every opts.checkpoint_every steps and on the way out."""
    model.train()
    started, start_step = time.perf_counter(), state["step"]
    bar = tqdm(total=opts.steps, initial=state["step"], desc="tune", unit="step",
               disable=not opts.progress, file=sys.stderr)
    interrupted = timed_out = False
    rng = torch.get_rng_state()
    try:
        while state["step"] < min(opts.steps, opts.until or opts.steps):
            t0, rng = time.perf_counter(), torch.get_rng_state()
            loss = _optimizer_step(model, tokenizer, examples, optimizer, state, opts, device)
            scheduler.step()
            state["step"] += 1
            state["position"] += opts.accumulate
            state["train_s"] += time.perf_counter() - t0
            state["losses"].append(round(loss, 4))
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if state["step"] % opts.checkpoint_every == 0:
                save_checkpoint(model, optimizer, scheduler, state, opts.out, _recipe(opts))
            minutes = (time.perf_counter() - started) / 60
            if opts.max_minutes is not None and minutes >= opts.max_minutes:
                timed_out = True
                break
    except KeyboardInterrupt:
        # The half-accumulated step is dropped: --resume redoes it from the same examples.
        optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        interrupted = True
    finally:
        bar.close()
    save_checkpoint(model, optimizer, scheduler, state, opts.out, _recipe(opts))
    done = state["step"] - start_step
    return TuneReport(opts.out, state["step"], opts.steps, state["position"],
                      state["train_s"], None if not done else
                      (time.perf_counter() - started) / done, None, None,
                      interrupted=interrupted, timed_out=timed_out, losses=state["losses"])


def format_tune_report(r: TuneReport) -> str:
    """The run in a few lines, as `rag tune` prints it."""
    def loss(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"
    state = ("interrupted: checkpoint saved, continue with --resume" if r.interrupted
             else "time is up: stopped and saved" if r.timed_out else "done")
    per_step = "-" if r.s_per_step is None else f"{r.s_per_step:.1f}"
    return "\n".join([
        f"{state}: step {r.step}/{r.steps}, {r.examples_seen} examples seen, "
        f"{r.train_s / 60:.1f} min training ({per_step} s/step)",
        f"validation loss before {loss(r.val_loss_before)}, after {loss(r.val_loss_after)}",
        f"adapter: {r.out}",
    ])
