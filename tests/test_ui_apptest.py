"""Page logic with Streamlit's AppTest, on the real library and the session's demo index."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "ui" / "app.py")
pytestmark = pytest.mark.slow


@pytest.fixture
def app(demo_index, env) -> AppTest:
    demo_index.lm  # noqa: B018 - converted model in the session cache first
    at = AppTest.from_file(APP, default_timeout=600)
    at.run()
    assert not at.exception
    return at


def test_chat_answers_with_sources_and_keeps_history(app: AppTest) -> None:
    app.chat_input[0].set_value("How many tokens are in the GPT-2 vocabulary?").run()
    assert not app.exception and not app.error
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    titles = [e.label for e in app.expander]
    assert titles and "bpe" in titles[0].replace("\\", "")
    assert any("tokens/s" in c.value for c in app.caption)
    history = app.session_state["messages"]
    assert history[-1]["answer"]["answer"].strip()

    app.chat_input[0].set_value("What is the capital of Peru?").run()
    assert [m.name for m in app.chat_message] == ["user", "assistant"] * 2
    assert any("could not find" in w.value for w in app.warning)


def test_sidebar_options_reach_the_chain(app: AppTest) -> None:
    mode = next(r for r in app.sidebar.radio if r.label == "Mode")
    mode.set_value("fulltext")
    strategy = next(r for r in app.sidebar.radio if r.label == "Strategy")
    strategy.set_value("sampling").run()
    opts = app.session_state["options"]
    assert opts["mode"] == "fulltext" and opts["do_sample"] is True
    assert "temperature" in opts
    app.chat_input[0].set_value("What does top-p sampling keep?").run()
    assert not app.exception and not app.error
    assert app.session_state["messages"][-1]["answer"]["answer"]


def test_clear_conversation(app: AppTest) -> None:
    app.chat_input[0].set_value("What is the capital of Peru?").run()
    assert app.session_state["messages"]
    next(b for b in app.sidebar.button if b.label == "Clear conversation").click().run()
    assert app.session_state["messages"] == []


def test_documents_page_lists_documents(app: AppTest) -> None:
    app.switch_page("views/documents.py").run()
    assert not app.exception
    table = app.dataframe[0].value
    assert len(table) == 8 and table["chunks"].min() >= 1


def test_empty_collection_shows_error_not_traceback(tmp_path, env) -> None:
    env.setenv("RAG_DB_URI", str(tmp_path / "empty"))
    at = AppTest.from_file(APP, default_timeout=600)
    at.run()
    at.chat_input[0].set_value("anything?").run()
    assert not at.exception
    assert any("rag ingest" in e.value for e in at.error)


def test_gpt_lab_page_steps_greedily(app: AppTest) -> None:
    app.switch_page("views/lab.py").run()
    assert not app.exception
    before = app.session_state["lab_text"]
    next(b for b in app.button if b.label == "Append greedy token").click().run()
    assert not app.exception
    assert app.session_state["lab_text"].startswith(before)
    assert len(app.session_state["lab_text"]) > len(before)


def test_document_text_renders_inert() -> None:
    from ui.render import answer_markdown, highlight

    hostile = "<script>alert(1)</script> [click](javascript:alert(1)) **bold**"
    shown = highlight(hostile, "click alert")
    assert "<script>" not in shown and "](javascript" not in shown and "**" not in shown
    assert ":orange-background[click]" in shown
    # bare URLs, www. names and addresses would become live links (GFM autolinks)
    linked = highlight("http://127.0.0.1:9/leak www.example.com me@example.com", "leak")
    assert "://" not in linked and "www\\." not in linked and "@e" not in linked
    answer = answer_markdown("Paris [1] and [9] <b>x</b>", n_sources=2)
    assert ":blue-badge[1]" in answer and "\\[9\\]" in answer and "<b>" not in answer


def test_chat_page_shows_no_stray_objects(app: AppTest) -> None:
    # Streamlit renders bare expressions ("magic"): only the page's own elements may appear.
    assert not app.get("help") and not app.table and not app.json


def test_password_gate_comes_before_any_page(demo_index, env) -> None:
    env.setenv("RAG_UI__PASSWORD", "correct horse")
    at = AppTest.from_file(APP, default_timeout=600)
    at.run()
    assert not at.exception and not at.chat_input  # nothing of the app before sign-in
    at.text_input[0].set_value("wrong")  # a form sends its values with its button
    at.button[0].click().run()
    assert any("Wrong password" in e.value for e in at.error) and not at.chat_input
    at.text_input[0].set_value("correct horse")
    at.button[0].click().run()
    assert not at.exception and at.chat_input
