"""`ingestion.engine = ray`: parse, chunk and embed on a Ray cluster with Ray Data, for
corpora one machine cannot embed in reasonable time. Same inputs, rows and report as the
local `Ingestor`, written to the same LanceDB table.

    driver (this process): walk, zip expansion and size limits (`Ingestor._expanded`), the
        stored hashes; a dataset with one row per document: its source, and either its
        path (workers read it) or its bytes (zip entries, uploads, files workers cannot see)
    CPU tasks: read → SHA-256 → unchanged? → load + chunk (`document_rows`, the local code)
    actors holding the `Embedder` (one GPU each when the cluster has GPUs): embed
    driver: stream the results back (`iter_batches`) and `upsert_documents` them in batches
        of whole documents, then refresh the indexes.

One dataset row is one document, so a document's chunks are never split between batches
and every write replaces whole documents, as in the local engine. Ray is imported only
here, and only when this engine is chosen.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ingest.pipeline import NAME_TAKEN, Ingestor, IngestReport, Progress, Steps, document_rows
from ingest.sources import FileResult, Item
from rag_app.embeddings import Embedder, count_tokens
from rag_app.errors import ClusterError, LoaderError, MissingDependencyError, RagError
from rag_app.settings import ChunkSettings, EmbeddingSettings, IngestionSettings
from rag_app.store import ChunkStore, chunk_schema

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger(__name__)

PARSE_BATCH_DOCS = 4  # documents per parse task (one dataset block)
EMBED_BATCH_DOCS = 32  # documents per call of an embedding actor
WINDOW_BYTES = 256 * 1024 * 1024  # bytes shipped from the driver per dataset run
# Heap reserved per parse task: Ray starts no more parse tasks than a node's memory allows.
# A reservation the embedding actors lack also keeps Ray Data from fusing parsing into them
# (it fuses map stages with equal resources), so parsing scales with the CPUs, not the actors.
PARSE_TASK_MEMORY = 768 * 1024 * 1024

_CHUNK = pa.struct([f for f in chunk_schema(1, "") if f.name != "vector"])
_INPUT = pa.schema([
    ("order", pa.int64()), ("source", pa.string()), ("path", pa.string()),
    ("data", pa.large_binary()), ("digest", pa.string()), ("known", pa.string()),
])
_PARSED = pa.schema([
    ("order", pa.int64()), ("source", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("rows", pa.list_(_CHUNK)), ("texts", pa.list_(pa.string())),
])
_VECTORS = pa.list_(pa.list_(pa.float32()))


def require_ray() -> ModuleType:
    """Ray with Ray Data, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"ingestion.engine=ray (RAG_INGESTION__ENGINE) needs Ray Data ({e}): "
            "pip install 'rag_app[ray]'") from e
    return ray


class RayIngestor(Ingestor):
    """`Ingestor` whose parsing, chunking and embedding run on Ray; writes stay here."""

    def __init__(self, embedder: Embedder, store: ChunkStore, chunking: ChunkSettings,
                 limits: IngestionSettings | None = None,
                 embedding: EmbeddingSettings | None = None) -> None:
        self.ray = require_ray()
        super().__init__(embedder, store, chunking, limits)
        self.embedding = embedding or EmbeddingSettings(model=embedder.name)

    def ingest(self, files: Iterable[Item], collection: str, progress: Progress | None = None,
               sync_prefixes: Iterable[str] = (), sync_glob: str | None = None,
               replace: bool = True, steps: Steps | None = None) -> IngestReport:
        """As `Ingestor.ingest`; results come out in input order. `steps` is not called
        (parsing and embedding run on the cluster): progress comes by file."""
        self._connect()
        workers_read = self._workers_read()
        known = self.store.document_hashes(collection)
        done: dict[int, FileResult] = {}

        def finish(order: int, result: FileResult) -> None:
            if result.status == "failed":
                log.warning("skipped %s: %s", result.path, result.error)
            done[order] = result
            if progress:
                progress(result)

        first: dict[str, int] = {}  # source -> order of its first occurrence
        repeats: list[tuple[int, str]] = []
        tasks: list[dict[str, Any]] = []
        shipped = 0
        for order, item in enumerate(self._expanded(files)):
            if isinstance(item, FileResult):
                finish(order, item)
                continue
            if item.source in first:
                repeats.append((order, item.source))
                continue
            first[item.source] = order
            task = {"order": order, "source": item.source, "path": None, "data": None,
                    "digest": None, "known": known.get(item.source)}
            # a name already taken, without `replace`: read here, where the digest is known
            if item.path is not None and workers_read and (replace or item.source not in known):
                tasks.append({**task, "path": item.path})
                continue
            try:
                data = item.read()
            except OSError as e:
                finish(order, FileResult(item.source, "failed",
                                         error=f"cannot read: {e.strerror or e}"))
                continue
            digest = hashlib.sha256(data).hexdigest()
            if known.get(item.source) == digest:
                finish(order, FileResult(item.source, "unchanged"))
                continue
            if not replace and item.source in known:
                finish(order, FileResult(item.source, "failed", error=NAME_TAKEN))
                continue
            tasks.append({**task, "data": data, "digest": digest})
            shipped += len(data)
            if shipped >= WINDOW_BYTES:  # bound the driver's memory: run what we have
                self._run(tasks, collection, finish)
                tasks, shipped = [], 0
        self._run(tasks, collection, finish)
        # A source given twice is read once, like the local engine's second read of a file
        # it just ingested: unchanged, or the same failure.
        for order, source in repeats:
            prev = done[first[source]]
            finish(order, FileResult(source, "failed", error=prev.error)
                   if prev.status == "failed" else FileResult(source, "unchanged"))

        report = IngestReport(results=[done[k] for k in sorted(done)])
        return self._conclude(collection, report, known, sync_prefixes, sync_glob)

    # -- Ray ------------------------------------------------------------------------------
    def _connect(self) -> None:
        """Attach to `ingestion.ray_address`, or start a local Ray; reuse one already
        initialised in this process."""
        ray = self.ray
        if not ray.is_initialized():
            address = self.limits.ray_address
            extra = {"include_dashboard": False} if address is None else {}
            with warnings.catch_warnings():
                # Ray fork+execs its processes; lancedb's fork warning does not apply.
                warnings.filterwarnings("ignore", "lancedb fork support", RuntimeWarning)
                try:
                    ray.init(address=address, logging_level=logging.WARNING, **extra)
                except (ConnectionError, RuntimeError, TimeoutError, ValueError) as e:
                    raise ClusterError(
                        f"cannot start or reach Ray at ingestion.ray_address={address!r} "
                        f"(RAG_INGESTION__RAY_ADDRESS): {e}") from e

    def _workers_read(self) -> bool:
        """Can Ray workers open this machine's paths? auto: only when every node is this
        machine (a local Ray); a Ray Client driver never shares its disk."""
        mode = self.limits.ray_read_files
        if mode != "auto":
            return mode == "workers"
        ray = self.ray
        if is_client(ray):
            return False
        here = ray.get_runtime_context().get_node_id()
        return all(n["NodeID"] == here for n in ray.nodes() if n["Alive"])

    def _embed_resources(self) -> tuple[int, dict[str, float]]:
        """Embedding actors and what each reserves: a GPU when the cluster has any."""
        cluster = self.ray.cluster_resources()
        gpus = int(cluster.get("GPU", 0))
        use_gpu = gpus > 0 and self.embedding.device in ("auto", "cuda")
        actors = self.limits.ray_embed_actors or (gpus if use_gpu else 1)
        cpus = cluster.get("CPU", 0)
        if cpus - actors * self.limits.ray_embed_cpus < 1:
            log.warning("the Ray cluster has %g CPUs and the %d embedding actors reserve %g "
                        "each, leaving none for parsing: it waits for more nodes; lower "
                        "ingestion.ray_embed_actors or ray_embed_cpus", cpus, actors,
                        self.limits.ray_embed_cpus)
        return actors, {"num_cpus": self.limits.ray_embed_cpus,
                        "num_gpus": 1 if use_gpu else 0}

    def _run(self, tasks: list[dict[str, Any]], collection: str,
             finish: Callable[[int, FileResult], None]) -> None:
        if not tasks:
            return
        actors, resources = self._embed_resources()
        plan = Plan(
            table=pa.Table.from_pylist(tasks, schema=_INPUT),
            parse_kwargs={"count": partial(count_tokens, self.embedder.tokenizer),
                          "size_tokens": self.size_tokens,
                          "overlap_tokens": self.overlap_tokens,
                          "embedding_model": self.embedder.name,
                          "limits": self.limits},
            embedding=self.embedding, actors=actors, resources=resources)
        batches = _through_coordinator(self.ray, plan) if is_client(self.ray) else plan.execute()
        pending: list[tuple[int, FileResult, list[dict[str, Any]]]] = []
        try:
            for batch in batches:
                for doc in batch.to_pylist():
                    if doc["status"] != "ingested":
                        finish(doc["order"], FileResult(doc["source"], doc["status"],
                                                        error=doc["error"]))
                        continue
                    rows = doc["rows"]
                    for row, vector in zip(rows, doc["vectors"], strict=True):
                        row["vector"] = vector
                    pending.append((doc["order"], FileResult(doc["source"], "ingested",
                                                             chunks=len(rows)), rows))
                    if sum(len(p[2]) for p in pending) >= self.limits.batch_chunks:
                        self._write(collection, pending, finish)
        except RagError:
            raise
        except Exception as e:
            cause = _rag_cause(e)
            if cause is not None:  # e.g. the embedding model is missing on a worker
                raise cause from e
            raise
        self._write(collection, pending, finish)

    def _write(self, collection: str, pending: list[tuple[int, FileResult, list[dict]]],
               finish: Callable[[int, FileResult], None]) -> None:
        if not pending:
            return
        self.store.upsert_documents(collection, {r.path: rows for _, r, rows in pending})
        for order, result, _ in pending:
            finish(order, result)
        pending.clear()


def is_client(ray: ModuleType) -> bool:
    """Is this process a Ray Client (`ray://`), whose disk the cluster cannot see?"""
    return ray.util.client.ray.is_connected()


def _rag_cause(e: BaseException) -> RagError | None:
    """The RagError a Ray worker raised, unwrapped from Ray's exceptions."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RagError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


# -- what runs on the cluster ------------------------------------------------------------
@dataclass
class Plan:
    """The Ray Data pipeline of one run; `execute` runs it where Ray Data's driver is (this
    process, or a coordinator actor on the cluster when this process is a Ray Client)."""

    table: pa.Table  # _INPUT rows
    parse_kwargs: dict[str, Any]
    embedding: EmbeddingSettings
    actors: int
    resources: dict[str, float]

    def execute(self) -> Iterator[pa.Table]:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # callers report
        blocks = [self.table.slice(i, PARSE_BATCH_DOCS)
                  for i in range(0, self.table.num_rows, PARSE_BATCH_DOCS)]
        ds = ray.data.from_arrow(blocks).map_batches(
            parse_batch, batch_format="pyarrow", batch_size=None, num_cpus=1,
            memory=PARSE_TASK_MEMORY, fn_kwargs=self.parse_kwargs,
        ).map_batches(
            EmbedActor, fn_constructor_kwargs={"settings": self.embedding},
            batch_format="pyarrow", batch_size=EMBED_BATCH_DOCS,
            compute=ray.data.ActorPoolStrategy(size=self.actors), **self.resources,
        )
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


class Coordinator:
    """Runs a `Plan` on the cluster for a Ray Client driver (Ray Data cannot execute from a
    client): a thread produces result batches into a bounded queue, `next` hands them out."""

    def __init__(self, plan: Plan) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        threading.Thread(target=self._produce, args=(plan,), daemon=True).start()

    def _produce(self, plan: Plan) -> None:
        try:
            for batch in plan.execute():
                self.queue.put(("batch", batch))
            self.queue.put(("done", None))
        except BaseException as e:  # handed to the driver, which raises it
            self.queue.put(("error", e))

    def next(self) -> tuple[str, Any]:
        return self.queue.get()


def _through_coordinator(ray: ModuleType, plan: Plan) -> Iterator[pa.Table]:
    coordinator = ray.remote(num_cpus=0, max_concurrency=2)(Coordinator).remote(plan)
    try:
        while True:
            kind, value = ray.get(coordinator.next.remote())
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        ray.kill(coordinator)


def parse_batch(batch: pa.Table, *, count: Callable[[str], int], size_tokens: int,
                overlap_tokens: int, embedding_model: str,
                limits: IngestionSettings) -> pa.Table:
    """Documents → their chunk rows and texts to embed (or unchanged / failed)."""
    out = [_parse(doc, count, size_tokens, overlap_tokens, embedding_model, limits)
           for doc in batch.to_pylist()]
    return pa.Table.from_pylist(out, schema=_PARSED)


def _parse(doc: dict[str, Any], count: Callable[[str], int], size_tokens: int,
           overlap_tokens: int, embedding_model: str,
           limits: IngestionSettings) -> dict[str, Any]:
    result = {"order": doc["order"], "source": doc["source"], "status": "failed",
              "error": None, "rows": [], "texts": []}
    data = doc["data"]
    if data is None:
        try:
            with open(doc["path"], "rb") as f:
                data = f.read()
        except OSError as e:
            return {**result, "error": f"cannot read: {e.strerror or e}"}
    digest = doc["digest"] or hashlib.sha256(data).hexdigest()
    if doc["known"] == digest:
        return {**result, "status": "unchanged"}
    try:
        rows, texts = document_rows(doc["source"], data, digest, count, size_tokens,
                                    overlap_tokens, embedding_model, limits)
    except LoaderError as e:
        return {**result, "error": str(e)}
    for row in rows:
        del row["vector"]
    return {**result, "status": "ingested", "rows": rows, "texts": texts}


class EmbedActor:
    """A Ray actor holding the embedder (on its GPU when Ray gave it one)."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.embedder = Embedder(settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("texts").to_pylist()
        flat = [t for doc in texts for t in doc]
        vectors = iter(self.embedder.embed_documents(flat) if flat else [])
        per_doc = [[next(vectors) for _ in doc] for doc in texts]
        return batch.drop_columns(["texts"]).append_column(
            "vectors", pa.array(per_doc, type=_VECTORS))
