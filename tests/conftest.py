"""Real components, built once per test session: LanceDB in a temp dir, the bundled
embedder, the bundled SmolLM2 (converted from its GGUF into a session cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.pipeline import Ingestor, walk
from rag_app.factory import Services
from rag_app.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--screenshots", type=Path, default=None, metavar="DIR",
                     help="keep the browser tests' page screenshots in DIR (e.g. docs)")


@pytest.fixture
def shots(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where the browser tests save page screenshots: --screenshots DIR, else a temp dir."""
    folder = request.config.getoption("--screenshots") or tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def demo_settings(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Settings:
    db = tmp_path_factory.mktemp("demo-db")
    # the fast decoder on every machine (auto takes it only where its native kernels run)
    return load_settings(db_uri=str(db), llm={"cache_dir": str(cache_dir), "engine": "fast"},
                         generation={"max_new_tokens": 96})


@pytest.fixture(scope="session")
def services(demo_settings: Settings) -> Services:
    return Services(demo_settings)


@pytest.fixture(scope="session")
def demo_index(services: Services) -> Services:
    """The demo corpus ingested once into the session's database."""
    report = Ingestor(services.embedder, services.store, services.settings.chunking).ingest(
        walk([DATA]), services.settings.collection)
    assert not report.failed
    return services


@pytest.fixture(scope="session")
def demo_questions() -> list[dict]:
    return json.loads((DATA / "questions.json").read_text())


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, demo_settings: Settings, cache_dir: Path):
    """Env vars for a shell (CLI / Streamlit) on the session's demo database."""
    monkeypatch.setenv("RAG_DB_URI", demo_settings.db_uri)
    monkeypatch.setenv("RAG_LLM__CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("RAG_GENERATION__MAX_NEW_TOKENS", "64")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return monkeypatch


def _pdf(pages: list[str], width: int = 600, height: int = 800) -> bytes:
    """A PDF with one page per string, each in a text layer (Helvetica)."""
    import io

    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                             NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    for text in pages:
        page = writer.add_blank_page(width, height)
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 10 Tf 20 {height - 100} Td ({text}) Tj ET".encode())
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


@pytest.fixture
def pdf_bytes():
    """Builds PDFs with a text layer: pdf_bytes(["page one text", "page two text"])."""
    return _pdf
