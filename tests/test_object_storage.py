"""RAG_DB_URI on object storage: a real S3-compatible server (moto in server mode) on
loopback, the library and the `rag` command against s3://bucket/path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from ingest.pipeline import Ingestor, walk
from rag_app.errors import StoreError
from rag_app.factory import Services

RAG = str(Path(sys.executable).with_name("rag"))
DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def s3_options() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free loopback port with a bucket `rag`; LanceDB storage options."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket="rag")
            break
        except Exception:  # the server is still starting
            if time.monotonic() > deadline:
                server.kill()
                raise
            time.sleep(0.1)
    yield {"aws_endpoint": endpoint, "aws_region": "us-east-1", "allow_http": "true", **creds}
    server.terminate()
    server.wait(timeout=10)


def on_s3(services: Services, uri: str, options: dict[str, str]) -> Services:
    s = Services(services.settings.model_copy(update={"db_uri": uri,
                                                      "db_storage_options": options}))
    s.__dict__["embedder"] = services.embedder
    return s


def test_ingest_search_and_delete_on_s3(services: Services, s3_options) -> None:
    s = on_s3(services, "s3://rag/library", s3_options)
    ingestor = Ingestor(s.embedder, s.store, s.settings.chunking)
    first = ingestor.ingest(walk([DATA]), "notes").to_json()
    assert first["ingested"] == 8 and not first["failed"]
    again = ingestor.ingest(walk([DATA]), "notes").to_json()
    assert again["unchanged"] == 8 and again["ingested"] == 0

    for mode in ("vector", "fulltext", "hybrid"):
        docs = s.retriever("notes").invoke("What is reciprocal rank fusion?", mode=mode)
        assert docs and all(d.metadata["source"].startswith(str(DATA)) for d in docs), mode
    assert s.store.collections() == ["notes"]

    victim = sorted(d["source"] for d in s.store.documents("notes"))[0]
    assert s.store.delete_documents("notes", [victim]) > 0
    assert victim not in {d["source"] for d in s.store.documents("notes")}


def test_cli_reads_the_storage_options_from_the_environment(s3_options, env) -> None:
    shell = {**os.environ, "RAG_DB_URI": "s3://rag/cli",
             "RAG_DB_STORAGE_OPTIONS": json.dumps(s3_options)}
    ingested = subprocess.run([RAG, "ingest", str(DATA / "lancedb.md"), "--json"], env=shell,
                              capture_output=True, text=True, timeout=600)
    assert ingested.returncode == 0, ingested.stderr
    assert json.loads(ingested.stdout)["ingested"] == 1
    found = subprocess.run([RAG, "search", "LanceDB full-text index", "--json"], env=shell,
                           capture_output=True, text=True, timeout=600)
    assert found.returncode == 0, found.stderr
    assert Path(json.loads(found.stdout)["hits"][0]["source"]).name == "lancedb.md"


def test_a_missing_bucket_is_a_clear_error_naming_rag_db_uri(services, s3_options) -> None:
    s = on_s3(services, "s3://no-such-bucket/db", s3_options)
    with pytest.raises(StoreError, match="RAG_DB_URI='s3://no-such-bucket/db'") as e:
        Ingestor(s.embedder, s.store, s.settings.chunking).ingest(
            walk([DATA / "lancedb.md"]), "notes")
    assert "NoSuchBucket" in str(e.value) or "does not exist" in str(e.value), e.value
