"""A local decoder-only causal LM: loading (HF id, folder, GGUF), decoding, streaming and
per-token probabilities, on top of transformers' `generate` and its streamer."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event, Thread
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TextIteratorStreamer,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from rag_app import fast_decoder, kernels
from rag_app.adapter import apply_adapter
from rag_app.decoding import TextPieces, beam_search, decode_steps, logits_processors
from rag_app.device import resolve_device, resolve_dtype
from rag_app.errors import ModelLoadError
from rag_app.gate import FairGate
from rag_app.grounded import (
    GroundedLogitsProcessor,
    Grounding,
    SpanIndex,
    answer_kind,
    bracket_tokens,
)
from rag_app.locate import resolve_model_ref
from rag_app.prompt import Message
from rag_app.settings import GenerationSettings, LLMSettings

log = logging.getLogger(__name__)


@dataclass
class TokenProb:
    text: str
    prob: float  # under the model's raw distribution (before temperature / top-k / top-p)
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    tokens: list[TokenProb]
    prompt_tokens: int
    first_token_s: float
    total_s: float
    streamed: bool
    token_ids: list[int] = field(default_factory=list)  # generated ids, special ones included

    @property
    def mean_logprob(self) -> float | None:
        if not self.tokens:
            return None
        return sum(math.log(max(t.prob, 1e-12)) for t in self.tokens) / len(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed after the first token; for beam search, which has no first token
        of its own, the whole answer's."""
        if not self.streamed:
            return len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0
        decode_s = self.total_s - self.first_token_s
        return (len(self.tokens) - 1) / decode_s if len(self.tokens) > 1 and decode_s > 0 else 0.0


class LocalLM:
    """A loaded causal LM and its tokenizer, with GPT decoding controls."""

    def __init__(self, settings: LLMSettings) -> None:
        self.name = settings.model
        self.adapter = settings.adapter_ref()  # merged into the weights at load, if any
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        if settings.threads and self.device == "cpu":
            torch.set_num_threads(settings.threads)
        started = time.perf_counter()
        self.model, self.tokenizer = _load(settings, self.device, self.dtype)
        self.model.eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.fast = _fast_decoder(self.model, settings, self.device)
        self.engine = "fast" if self.fast else "transformers"
        self.gate = FairGate()  # generations of several users take turns
        log.info("loaded %s on %s/%s (%s) in %.1fs", self.name, self.device, self.dtype,
                 self.engine, time.perf_counter() - started)

    @property
    def dtype_name(self) -> str:
        """What the answers are computed in, as reported to users."""
        if self.fast is not None:
            return "int4 weights, bfloat16"
        return str(self.dtype).removeprefix("torch.")

    @property
    def engine_name(self) -> str:
        """Who decodes, as reported to users (`--json`'s "engine")."""
        if self.fast is None:
            return "transformers generate"
        return f"fast decoder, {'native kernels' if self.fast.native else 'PyTorch operations'}"

    # -- tokens ---------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[Message]) -> dict[str, torch.Tensor]:
        if self.tokenizer.chat_template:
            enc = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, return_dict=True,
                return_tensors="pt")
        else:  # base models without a template: plain "role: content" lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            enc = self.tokenizer(text, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def count_chat_tokens(self, messages: Sequence[Message]) -> int:
        return int(self.encode_chat(messages)["input_ids"].shape[1])

    # -- generation -----------------------------------------------------------------------
    def stream(self, messages: Sequence[Message], options: GenerationSettings,
               stop: Sequence[str] | None = None, grounding: Grounding | None = None
               ) -> Iterator[str | Generation]:
        """Yield text pieces as they are decoded, then one final `Generation`.

        Beam search cannot stream (it keeps several hypotheses until the end):
        it yields its final text as one piece. `grounding`: the answer may only copy a span
        of these passages (`rag_app.grounded`), whatever the decoding strategy.
        """
        enc = self.encode_chat(messages)
        prompt_len = int(enc["input_ids"].shape[1])
        first = self._grounded(grounding, prompt_len, options)
        config = self._generation_config(options, stop, warp=not first)
        if options.seed is not None:
            set_seed(options.seed)
        started = time.perf_counter()
        if self.fast is not None and options.num_beams == 1:
            yield from self._stream_fast(enc, options, stop, started, first)
            return
        if self.fast is not None:
            prompt = enc["input_ids"]
            ids, logits = beam_search(self.fast, prompt, options,
                                      self._fast_stops(options, prompt_len, stop),
                                      self._eos_ids(), first)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            elapsed = time.perf_counter() - started
            yield text
            yield Generation(text, self._probs_from_logits(torch.tensor(ids), logits),
                             prompt_len, elapsed, elapsed, streamed=False, token_ids=ids)
            return
        # grounded: the mask first, then the warpers (generate would put its own first)
        processors = logits_processors(options, first) if first else LogitsProcessorList()
        if options.num_beams > 1:
            with torch.inference_mode():
                out = self.model.generate(**enc, generation_config=config,
                                          stopping_criteria=self._stops(options, prompt_len),
                                          logits_processor=processors,
                                          tokenizer=self.tokenizer)
            ids = out.sequences[0, prompt_len:]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            elapsed = time.perf_counter() - started
            yield text
            yield Generation(text, self._probs_by_forward(enc, ids), prompt_len, elapsed,
                             elapsed, streamed=False, token_ids=ids.tolist())
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True, timeout=600)
        result: dict[str, Any] = {}
        cancel = Event()
        stops = self._stops(options, prompt_len)
        stops.append(CancelStop(cancel))

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(
                        **enc, generation_config=config, streamer=streamer,
                        stopping_criteria=stops, logits_processor=processors,
                        tokenizer=self.tokenizer)
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e
                streamer.end()

        thread = Thread(target=run, daemon=True)
        thread.start()
        first: float | None = None
        pieces = []
        try:
            for piece in streamer:
                if piece and first is None:
                    first = time.perf_counter() - started
                pieces.append(piece)
                yield piece
        finally:
            # A consumer that stops early (a closed browser tab, a Streamlit rerun) closes this
            # generator: decoding stops too, so the model is really free for the next request.
            cancel.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        total = time.perf_counter() - started
        out = result["out"]
        ids = out.sequences[0, prompt_len:]
        yield Generation("".join(pieces), self._probs_from_logits(ids, out.logits), prompt_len,
                         first if first is not None else total, total, streamed=True,
                         token_ids=ids.tolist())

    def _grounded(self, grounding: Grounding | None, prompt_len: int,
                  options: GenerationSettings) -> list[GroundedLogitsProcessor]:
        """The grounded mask for this prompt, or nothing (free answers)."""
        if grounding is None:
            return []
        index = SpanIndex(self.tokenizer, grounding.passages, grounding.extra, grounding.focus)
        bias: list[tuple[Sequence[int], float]] = []
        if options.echo_penalty and grounding.question:
            bias.append((index.echo_starts(self.tokenizer, grounding.question),
                         -options.echo_penalty))
        kind = answer_kind(grounding.question) if options.kind_bias else None
        if kind:
            bias.append((index.kind_starts(self.tokenizer, kind), options.kind_bias))
        return [GroundedLogitsProcessor(index, prompt_len, bracket_tokens(self.tokenizer),
                                        self._eos_ids(), bias)]

    def _stream_fast(self, enc: dict[str, torch.Tensor], options: GenerationSettings,
                     stop: Sequence[str] | None, started: float,
                     grounded: Sequence[LogitsProcessor] = ()) -> Iterator[str | Generation]:
        """The fast decoder's loop; closing this generator stops decoding."""
        assert self.fast is not None
        prompt = enc["input_ids"]
        stops, eos_ids = self._fast_stops(options, prompt.shape[1], stop), self._eos_ids()
        ids: list[int] = []
        logits: list[torch.Tensor] = []

        def decoded() -> Iterator[str]:
            text = TextPieces(self.tokenizer)
            for token, step_logits in decode_steps(self.fast, prompt, options, stops, eos_ids,
                                                   grounded):
                ids.append(token)
                logits.append(step_logits)
                text.put(torch.tensor([token]))
                yield from text.take()
            text.end()
            yield from text.take()

        pieces = []
        first: float | None = None
        for piece in decoded():
            if piece and first is None:
                first = time.perf_counter() - started
            pieces.append(piece)
            yield piece
        total = time.perf_counter() - started
        token_ids = torch.tensor(ids, dtype=torch.long)
        yield Generation("".join(pieces), self._probs_from_logits(token_ids, logits),
                         int(prompt.shape[1]), first if first is not None else total, total,
                         streamed=True, token_ids=ids)

    def generate(self, messages: Sequence[Message], options: GenerationSettings,
                 stop: Sequence[str] | None = None, grounding: Grounding | None = None
                 ) -> Generation:
        final = None
        for item in self.stream(messages, options, stop, grounding):
            if isinstance(item, Generation):
                final = item
        assert final is not None
        return final

    def _fast_stops(self, o: GenerationSettings, prompt_len: int,
                    stop: Sequence[str] | None) -> StoppingCriteriaList:
        """The fast decoder's stopping criteria: `_stops` and the stop strings."""
        stops = self._stops(o, prompt_len)
        if stop:
            stops.append(StopStringCriteria(self.tokenizer, list(stop)))
        return stops

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos}

    @staticmethod
    def _stops(o: GenerationSettings, prompt_len: int) -> StoppingCriteriaList:
        stops = StoppingCriteriaList()
        if o.stop_on_repeat:
            stops.append(RepetitionStop(prompt_len, o.stop_on_repeat))
        return stops

    def _generation_config(self, o: GenerationSettings, stop: Sequence[str] | None,
                           warp: bool = True) -> GenerationConfig:
        """`warp=False`: the sampling warpers are passed as processors instead."""
        config = GenerationConfig(
            max_new_tokens=o.max_new_tokens, do_sample=o.do_sample,
            repetition_penalty=o.repetition_penalty, num_beams=o.num_beams,
            return_dict_in_generate=True, output_logits=o.num_beams == 1,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            eos_token_id=self.model.generation_config.eos_token_id
            or self.tokenizer.eos_token_id,
            stop_strings=list(stop) if stop else None,
        )
        if o.do_sample and warp:
            config.temperature, config.top_k, config.top_p = o.temperature, o.top_k, o.top_p
        else:
            config.temperature, config.top_k, config.top_p = None, None, None
        if o.num_beams > 1:
            config.length_penalty, config.early_stopping = o.length_penalty, True
        return config

    def _probs_from_logits(self, ids: torch.Tensor, logits: Sequence[torch.Tensor],
                           top: int = 5) -> list[TokenProb]:
        # logits: one (batch=1, vocab) tensor per generated step, before any processor
        probs = torch.softmax(torch.stack([step[0] for step in logits]).float(), dim=-1)
        return self._token_probs(ids, probs, top)

    def _probs_by_forward(self, enc: dict[str, torch.Tensor], ids: torch.Tensor,
                          top: int = 5) -> list[TokenProb]:
        """Teacher-forced probabilities of `ids` after the prompt (used for beam search)."""
        if ids.numel() == 0:
            return []
        full = torch.cat([enc["input_ids"][0], ids]).unsqueeze(0)  # (1, T)
        with torch.inference_mode():
            logits = self.model(full).logits[0]  # (T, vocab)
        start = enc["input_ids"].shape[1] - 1
        probs = torch.softmax(logits[start:start + len(ids)].float(), dim=-1)
        return self._token_probs(ids, probs, top)

    def _token_probs(self, ids: torch.Tensor, probs: torch.Tensor, top: int) -> list[TokenProb]:
        n = min(len(ids), probs.shape[0])
        top_p, top_i = probs[:n].topk(top, dim=-1)
        special = set(self.tokenizer.all_special_ids)
        out = []
        for step in range(n):
            token = int(ids[step])
            if token in special:
                continue
            out.append(TokenProb(
                self.tokenizer.decode([token]), float(probs[step, token]),
                [(self.tokenizer.decode([int(i)]), float(p))
                 for p, i in zip(top_p[step], top_i[step], strict=True)]))
        return out


class CancelStop(StoppingCriteria):
    """Stops `generate` once its event is set (transformers has no cancel of its own)."""

    def __init__(self, event: Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class RepetitionStop(StoppingCriteria):
    """Stop once the answer's last `window` tokens already occurred earlier in the answer:
    small models fall into loops, and a loop never ends on its own."""

    def __init__(self, prompt_len: int, window: int) -> None:
        self.prompt_len = prompt_len
        self.window = window

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        done = []
        for row in input_ids:  # (T,) per sequence
            answer = row[self.prompt_len:].tolist()
            tail = answer[-self.window:]
            earlier = answer[:-1]
            done.append(len(answer) >= 2 * self.window and any(
                earlier[i:i + self.window] == tail for i in range(len(earlier) - self.window)))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _load(settings: LLMSettings, device: str, dtype: torch.dtype
          ) -> tuple[PreTrainedModel, Any]:
    ref = resolve_model_ref(settings.model, "llm.model")
    kwargs = {"trust_remote_code": settings.trust_remote_code}
    quantization = quantization_config(settings.quantization, device, dtype)  # fail first
    try:
        if ref.endswith(".gguf"):
            ref = str(_gguf_to_cache(Path(ref), settings.cache_dir))
        _require_decoder(AutoConfig.from_pretrained(ref, **kwargs))
        tokenizer = AutoTokenizer.from_pretrained(ref, **kwargs)
        if quantization is not None:  # bitsandbytes places the weights on the GPU itself
            return AutoModelForCausalLM.from_pretrained(
                ref, dtype=dtype, quantization_config=quantization, device_map={"": device},
                **kwargs), tokenizer
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, **kwargs).to(device)
    except ValueError as e:
        raise ModelLoadError(
            f"llm.model={settings.model!r} is not a causal language model ({e}); "
            "set llm.model (RAG_LLM__MODEL) to a decoder-only model") from e
    except OSError as e:
        raise ModelLoadError(
            f"cannot load llm.model={settings.model!r}: {e}; set llm.model (RAG_LLM__MODEL) "
            "to a local folder, a .gguf file or a model id in your Hugging Face cache") from e
    except torch.OutOfMemoryError as e:
        raise ModelLoadError(
            f"out of memory loading llm.model={settings.model!r} on {device}; choose a "
            "smaller llm.model, llm.dtype=bfloat16, or llm.device=cpu") from e
    return apply_adapter(model, settings), tokenizer


def quantization_config(mode: str, device: str, dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for llm.quantization, or None; a clear error where
    bitsandbytes cannot run (it needs CUDA and the package)."""
    if mode == "none":
        return None
    if not device.startswith("cuda"):
        raise ModelLoadError(
            f"llm.quantization={mode!r} (RAG_LLM__QUANTIZATION) needs a CUDA GPU, but the model "
            f"runs on {device}; set llm.quantization=none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ModelLoadError(
            f"llm.quantization={mode!r} needs bitsandbytes: pip install bitsandbytes, or set "
            "llm.quantization=none (RAG_LLM__QUANTIZATION)") from e
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype)


def _fast_decoder(model: PreTrainedModel, settings: LLMSettings, device: str
                  ) -> fast_decoder.FastLlama | None:
    """The fast CPU decoder when llm.engine asks for it (or `auto` allows it), else None."""
    fits = (device == "cpu" and settings.quantization == "none"
            and fast_decoder.supports(model))
    if settings.engine == "fast" and not fits:
        raise ModelLoadError(
            f"llm.engine=fast (RAG_LLM__ENGINE) runs Llama-architecture models on the CPU "
            f"only; llm.model={settings.model!r} is {model.config.model_type} on {device}: "
            "set llm.engine=auto or transformers")
    if settings.engine == "fast":
        return fast_decoder.FastLlama(model, _native_kernels(model, settings))
    if settings.engine == "auto" and fits and settings.dtype == "auto":
        native = _native_kernels(model, settings, warn=False)
        # Without its native kernels (no AVX-512) the fast decoder's PyTorch steps take about
        # twice generate's time to read a prompt (measured on an AVX2 CPU): auto takes it
        # only where the kernels run, or where llm.kernels=torch asks for it.
        if native is not None or settings.kernels == "torch":
            return fast_decoder.FastLlama(model, native)
        log.info("transformers generate decodes (llm.engine=fast: the fast decoder's "
                 "PyTorch steps)")
    return None


def _native_kernels(model: PreTrainedModel, settings: LLMSettings, warn: bool = True) -> Any:
    """The fast decoder's native kernels, or None for PyTorch operations (llm.kernels);
    `warn`: say so when they do not build or run here."""
    if settings.kernels == "torch":
        return None
    try:
        fast_decoder.require_kernel_shape(model.config)
        return kernels.native_ops(settings.cache_dir)
    except kernels.KernelUnavailable as e:
        if settings.kernels == "native":
            raise ModelLoadError(f"llm.kernels=native (RAG_LLM__KERNELS): {e}; set it to auto "
                                 "or torch") from e
        if warn:
            log.warning("%s; the fast decoder uses PyTorch operations", e)
        else:
            log.info("%s", e)
        return None


def _require_decoder(config: PretrainedConfig) -> None:
    """Refuse encoders (BERT) and encoder-decoders (T5) that Auto* would load with a fresh,
    untrained LM head."""
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = getattr(config, "architectures", None) or []
    if config.is_encoder_decoder or (archs and not causal.intersection(archs)):
        raise ValueError(f"architecture {archs or config.model_type} is not a decoder-only LM")


def _gguf_to_cache(gguf: Path, cache_dir: Path) -> Path:
    """De-quantize a GGUF once and save it as safetensors, keyed by the file's hash."""
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    target = cache_dir / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s once into %s (later starts load the saved copy)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model although its weights are plain
    # floats: rebuild a clean one from the config and copy the weights across.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=False)
    clean.tie_weights()
    tmp = target.with_name(target.name + ".partial")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a crash never leaves a half-saved model behind
    return target
