"""`rag ui` as a user meets it: a real Streamlit server driven by headless Chromium."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:  # `make test` installs it; say so loudly rather than pass silently
    pytest.skip("Chromium is not installed (make test installs Debian's chromium)",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ui_server(log_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `rag ui` on a free port, healthy; terminated (then killed) afterwards."""
    port = _free_port()
    log = log_path.open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("rag")), "ui", "--port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Streamlit server did not start: " + log_path.read_text())
    try:
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def server(demo_index, env, tmp_path: Path, request):
    demo_index.lm  # noqa: B018 - converted model in the session cache first
    if getattr(request, "param", None) == "empty":
        env.setenv("RAG_DB_URI", str(tmp_path / "fresh-db"))
    with ui_server(tmp_path / "ui.log") as (_, url):
        yield url


def test_terminating_rag_ui_stops_its_server(env, tmp_path: Path) -> None:
    """A service manager's SIGTERM to `rag ui` must not leave a server behind it."""
    with ui_server(tmp_path / "ui.log") as (proc, url):
        proc.terminate()
        assert proc.wait(timeout=30) is not None
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)


def _listening(port: int) -> set[str]:
    """Local addresses (as /proc/net/tcp{,6} spell them) of sockets listening on `port`."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def _chromium(p, *args: str):
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", *args])


@contextmanager
def leak_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on loopback that records every path requested of it."""
    import http.server
    import threading

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()


def test_ui_listens_on_loopback_only_and_refuses_other_host_names(env, tmp_path: Path) -> None:
    """Private by default: loopback only, no lookup of the machine's external address, and
    a page of another site that resolves its own name to this machine (DNS rebinding)
    gets a refusal, not the app."""
    from playwright.sync_api import sync_playwright

    log_path = tmp_path / "ui.log"
    with ui_server(log_path) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        assert _listening(port) == {"0100007F"}  # 127.0.0.1, and nothing else
        deadline = time.time() + 30
        while f"URL: http://127.0.0.1:{port}" not in log_path.read_text():
            assert time.time() < deadline, log_path.read_text()
            time.sleep(0.5)
        assert "Network URL" not in log_path.read_text()
        assert "External URL" not in log_path.read_text()
        with sync_playwright() as p:
            browser = _chromium(p, "--host-resolver-rules=MAP evil.example 127.0.0.1")
            page = browser.new_page()
            page.goto(f"http://evil.example:{port}/documents")
            page.get_by_text("answers only at its own address").wait_for(timeout=120_000)
            idle(page)
            assert page.locator("input[type=file]").count() == 0
            assert page.get_by_test_id("stSidebarNav").count() == 0
            browser.close()


@pytest.fixture
def page(server: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server)
        page.get_by_test_id("stChatInputTextArea").wait_for(timeout=120_000)  # first run done
        yield page
        browser.close()


def idle(page) -> None:
    """Wait until Streamlit has finished running the script (its own state, no sleeps)."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]',
                           timeout=300_000)


def ask(page, question: str) -> str:
    box = page.get_by_test_id("stChatInputTextArea")
    box.wait_for(timeout=120_000)
    box.fill(question)
    box.press("Enter")
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="running"]',
                           timeout=30_000)
    idle(page)
    return page.get_by_test_id("stChatMessage").last.inner_text()


@pytest.mark.parametrize("server", ["empty"], indirect=True)
def test_upload_ask_delete_in_browser(page, server: str, tmp_path: Path, shots: Path) -> None:
    with leak_server() as (leak, requested):
        _upload_ask_delete(page, server, tmp_path, shots, leak)
    # the document's image and link are shown as text: the browser never fetched them
    assert requested == []


def _upload_ask_delete(page, server: str, tmp_path: Path, shots: Path, leak: str) -> None:
    note = tmp_path / "reactor-notes.md"
    note.write_text("# Kepler station\n\nThe Zorblat reactor on Kepler station produces "
                    "42 gigawatts of power. It was switched on in 2091. "
                    f"![diagram]({leak}/leak.png?data=quokka) <img src='{leak}/img.png'> "
                    f"[manual]({leak}/manual)\n")
    page.goto(server + "/documents")
    page.get_by_text("No documents yet").wait_for(timeout=120_000)
    page.locator("input[type=file]").set_input_files(str(note))
    page.get_by_role("button", name="Ingest").click()
    page.get_by_text("1 ingested").wait_for(timeout=120_000)
    idle(page)
    page.screenshot(path=str(shots / "documents.png"), full_page=True)
    page.get_by_test_id("stMultiSelect").wait_for()  # the document list offers it for deletion

    page.goto(server)
    idle(page)
    message = ask(page, "How much power does the Zorblat reactor produce?")
    answer_text = (page.get_by_test_id("stChatMessage").last
                   .get_by_test_id("stMarkdownContainer").first.inner_text())
    assert "reactor-notes.md" in message and re.search(r"\b42\b", answer_text), answer_text
    card = (page.get_by_test_id("stChatMessage").last.get_by_test_id("stExpander")
            .filter(has_text="reactor-notes.md").first)
    # the uploaded file supports the answer: copied from it (grounded, the default), cited
    # by the model, or matched to its words
    assert re.search(r"· (the answer is copied from here|cited|matched to the answer)",
                     card.inner_text()), card.inner_text()
    if not card.get_by_text("![diagram]").count():  # a collapsed card: open it
        card.locator("summary").click()
    card.get_by_text("![diagram]").first.wait_for(timeout=10_000)  # shown, as text
    live = card.locator(f"img[src*='{leak}'], a[href^='{leak}']")
    assert live.count() == 0, [live.nth(i).evaluate("e => e.outerHTML")
                               for i in range(live.count())]

    page.goto(server + "/documents")
    idle(page)
    page.get_by_test_id("stMultiSelect").click()
    page.get_by_role("option", name="upload/reactor-notes.md").click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Delete selected").click()
    page.get_by_text("No documents yet").wait_for(timeout=60_000)
    page.goto(server)
    idle(page)
    answer = ask(page, "How much power does the Zorblat reactor produce?")
    assert "no documents" in answer or "could not find" in answer


def test_question_in_browser_gets_streamed_answer_with_sources(page, shots: Path) -> None:
    box = page.get_by_test_id("stChatInputTextArea")
    box.wait_for(timeout=120_000)
    box.fill("How many tokens are in the GPT-2 vocabulary?")
    box.press("Enter")
    cards = page.get_by_test_id("stExpander")
    cards.first.wait_for(timeout=120_000)
    page.get_by_text("tokens/s").wait_for(timeout=300_000)
    assert "bpe-tokenization.md" in cards.first.inner_text()
    answer = page.get_by_test_id("stChatMessage").last.inner_text()
    assert len(answer.strip()) > 20
    cards.first.click()
    page.get_by_text("50,257").first.wait_for(timeout=10_000)  # the passage itself
    page.screenshot(path=str(shots / "chat.png"), full_page=True)


def test_gpt_lab_in_browser(page, server: str, shots: Path) -> None:
    page.goto(server + "/lab")
    idle(page)
    page.get_by_text("1 · BPE tokens").wait_for(timeout=120_000)
    # The default prompt's token ids, its next-token chart and the attention heatmap.
    page.get_by_text("tokens · ids:").wait_for()
    page.get_by_text("4 · Causal attention").wait_for()
    # Vega draws the charts after the script has finished: wait for the second one
    page.locator("canvas, svg.marks").nth(1).wait_for(timeout=60_000)
    assert page.locator("canvas, svg.marks").count() >= 2
    page.screenshot(path=str(shots / "lab.png"), full_page=True)


def test_two_sessions_take_turns_and_the_waiting_one_says_so(page, server: str) -> None:
    other = page.context.browser.new_page(viewport={"width": 1280, "height": 900})
    other.goto(server)
    other.get_by_test_id("stChatInputTextArea").wait_for(timeout=120_000)
    questions = ("How many tokens are in the GPT-2 vocabulary?",
                 "Who introduced nucleus (top-p) sampling, and in what year?")
    for tab, question in zip((page, other), questions, strict=True):
        box = tab.get_by_test_id("stChatInputTextArea")
        box.fill(question)
        box.press("Enter")
    for tab in (page, other):
        tab.get_by_text("tokens/s").wait_for(timeout=300_000)
        idle(tab)
    captions = [tab.get_by_test_id("stChatMessage").last.inner_text() for tab in (page, other)]
    # One model serves both sessions: the later generation waited for the earlier one and
    # its caption says how long; both got their answers.
    assert sum("for the model" in c for c in captions) == 1, captions
    assert all("tokens/s" in c for c in captions)


@pytest.mark.parametrize("server", ["empty"], indirect=True)
def test_a_pdf_source_opens_at_its_page_with_the_copied_words_marked(
        page, server: str, shots: Path) -> None:
    """An uploaded PDF (its original kept): the answer's card opens the cited page, drawn,
    with the passage shaded and the answer's copied words outlined."""
    pdf = Path(__file__).resolve().parent / "corpus" / "amsldoc-pages.pdf"
    page.goto(server + "/documents")
    page.get_by_text("No documents yet").wait_for(timeout=120_000)
    page.locator("input[type=file]").set_input_files(str(pdf))
    page.get_by_role("button", name="Ingest").click()
    page.get_by_text("1 ingested").wait_for(timeout=120_000)
    page.goto(server)
    idle(page)
    ask(page, "Where can a newer version of the amsmath package be downloaded?")
    card = (page.get_by_test_id("stChatMessage").last.get_by_test_id("stExpander")
            .filter(has_text="amsmath.zip").first)
    # a grounded answer, copied from the card's passage (a link split over two lines)
    assert "the answer is copied from here" in card.inner_text(), card.inner_text()
    button = card.get_by_role("button", name=re.compile("Open at"))
    assert button.inner_text().strip().endswith("p. 1 (PDF page 2)"), button.inner_text()
    button.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("the passage shaded").wait_for(timeout=60_000)
    dialog.locator("img").first.wait_for(timeout=30_000)
    text = dialog.inner_text()
    assert "p. 1 (PDF page 2)" in text and "copied words outlined (1)" in text, text
    page.screenshot(path=str(shots / "source.png"), full_page=True)
