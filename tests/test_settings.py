from pathlib import Path

import pytest

from rag_app.errors import SettingsError
from rag_app.settings import BUNDLED_LLM, load_settings


def test_env_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_DB_URI", "/tmp/elsewhere")
    monkeypatch.setenv("RAG_GENERATION__TEMPERATURE", "0.3")
    s = load_settings()
    assert s.db_uri == "/tmp/elsewhere"
    assert s.generation.temperature == 0.3


def test_invalid_env_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_LLM__DEVICE", "gpu")
    with pytest.raises(SettingsError, match=r"llm\.device \(RAG_LLM__DEVICE\)"):
        load_settings()


@pytest.mark.parametrize(("overrides", "field"), [
    ({"generation": {"top_p": 1.5}}, "generation.top_p"),
    ({"generation": {"temperature": 0}}, "generation.temperature"),
    ({"generation": {"num_beams": 3, "do_sample": True}}, "generation.num_beams"),
    ({"chunking": {"size_tokens": 64, "overlap_tokens": 64}}, "chunking.overlap_tokens"),
    ({"collection": "../x"}, "collection"),
    ({"retrieval": {"mode": "magic"}}, "retrieval.mode"),
])
def test_invalid_values_fail_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(SettingsError, match=field.replace(".", r"\.")):
        load_settings(**overrides)


def test_toml_file_is_read_and_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "rag.toml"
    cfg.write_text('collection = "notes"\n[retrieval]\nk = 7\nmode = "vector"\n')
    monkeypatch.setenv("RAG_RETRIEVAL__K", "3")
    s = load_settings(cfg)
    assert (s.collection, s.retrieval.mode, s.retrieval.k) == ("notes", "vector", 3)


def test_yaml_file_is_read(tmp_path: Path) -> None:
    cfg = tmp_path / "rag.yaml"
    cfg.write_text("generation:\n  max_new_tokens: 42\n")
    assert load_settings(cfg).generation.max_new_tokens == 42


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "rag.toml"
    cfg.write_text("colection = 'typo'\n")
    with pytest.raises(SettingsError, match="colection"):
        load_settings(cfg)


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_ui_is_private_unless_a_password_guards_it() -> None:
    assert load_settings().ui.host == "127.0.0.1"
    with pytest.raises(SettingsError, match="ui.password"):
        load_settings(ui={"host": "0.0.0.0"})
    exposed = load_settings(ui={"host": "0.0.0.0", "password": "long secret"})
    assert "long secret" not in repr(exposed) and "long secret" not in exposed.model_dump_json()
    with pytest.raises(SettingsError, match="ui.password must not be empty"):
        load_settings(ui={"password": ""})


def test_serve_is_private_unless_a_token_guards_it() -> None:
    assert load_settings().serve.host == "127.0.0.1" and load_settings().serve.token is None
    with pytest.raises(SettingsError, match=r"serve.token \(RAG_SERVE__TOKEN\)"):
        load_settings(serve={"host": "0.0.0.0"})
    exposed = load_settings(serve={"host": "0.0.0.0", "token": "tok-secret"})
    assert "tok-secret" not in repr(exposed) and "tok-secret" not in exposed.model_dump_json()
    for bad, message in (({"token": " "}, "serve.token must not be empty"),
                         ({"url": "localhost:8000"}, "serve.url"),
                         ({"port": 0}, "serve.port")):
        with pytest.raises(SettingsError, match=message):
            load_settings(serve=bad)


def test_host_check_names_only_this_machine() -> None:
    from ui.gate import allowed_host

    ui = load_settings().ui
    for ok in ("localhost:8501", "127.0.0.1:8501", "[::1]:8501", "http://localhost:8501"):
        assert allowed_host(ok, ui), ok
    for bad in ("evil.example:8501", "http://evil.example", "", "127.0.0.1.evil.example"):
        assert not allowed_host(bad, ui), bad
    assert allowed_host("evil.example", load_settings(ui={"password": "pw"}).ui)


@pytest.mark.parametrize(("name", "content"), [
    ("bad.toml", b"[llm\nmodel = 1\n"),  # malformed TOML
    ("latin1.toml", b'collection = "caf\xe9"\n'),  # not UTF-8
    ("bad.yaml", b"a: [1\n"),  # malformed YAML
    ("list.yaml", b"- 1\n- 2\n"),  # YAML, but not a table of settings
])
def test_a_broken_settings_file_is_one_error_naming_it(tmp_path: Path, name: str,
                                                       content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SettingsError, match=rf"{name}: not a valid settings file"):
        load_settings(path)


@pytest.mark.parametrize(("var", "value", "says"), [
    ("RAG_DB_STORAGE_OPTIONS", "not json", "db_storage_options"),
    ("RAG_INGESTION__MAX_FILE_MB", "inf", "ingestion.max_file_mb"),
    ("RAG_INGESTION__MAX_ARCHIVE_MB", "nan", "ingestion.max_archive_mb"),
])
def test_unparsable_or_infinite_env_values_name_the_setting(
        monkeypatch: pytest.MonkeyPatch, var: str, value: str, says: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=says):
        load_settings()


@pytest.mark.parametrize(("overrides", "field"), [
    ({"ingestion": {"parse_timeout_s": 0}}, "ingestion.parse_timeout_s"),
    ({"ingestion": {"parse_timeout_s": float("inf")}}, "ingestion.parse_timeout_s"),
    ({"ingestion": {"parse_timeout_s": float("nan")}}, "ingestion.parse_timeout_s"),
    ({"ingestion": {"parse_memory_mb": 0}}, "ingestion.parse_memory_mb"),
    ({"ingestion": {"max_pdf_pages": 0}}, "ingestion.max_pdf_pages"),
    ({"generation": {"seed": 2**32}}, "generation.seed"),
    ({"generation": {"seed": -1}}, "generation.seed"),
    ({"db_uri": ""}, "db_uri"),
    ({"db_uri": "  "}, "db_uri"),
])
def test_parse_budgets_seeds_and_the_database_are_checked(overrides: dict, field: str) -> None:
    with pytest.raises(SettingsError, match=field.replace(".", r"\.")):
        load_settings(**overrides)


def test_an_empty_db_uri_in_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_DB_URI", "")  # LanceDB would write into the current folder
    with pytest.raises(SettingsError, match=r"db_uri \(RAG_DB_URI\): .*must not be empty"):
        load_settings()


@pytest.mark.parametrize("name", [
    "default", "notes_2024", "a-b", "v1.2", "-x", "日本語", "café", "a b", "a/b", "../x", "",
    ".", "..", "x\u0301", "tab\t", "x" * 128, "x" * 129])
def test_collection_names_follow_lancedbs_rule_with_a_length_limit(name: str) -> None:
    from lancedb.util import validate_table_name

    try:
        validate_table_name(name)
        lancedb_ok = True
    except ValueError:
        lancedb_ok = False
    if lancedb_ok and len(name) <= 128:
        assert load_settings(collection=name).collection == name
    else:
        with pytest.raises(SettingsError, match=r"invalid setting collection \(RAG_COLLECTION\)"):
            load_settings(collection=name)


def test_unknown_rag_variables_are_warned_about_with_the_closest_name(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("RAG_RETRIEVAL__KK", "3")
    monkeypatch.setenv("RAG_INGESTION__PARSE_TIMEOUT", "5")
    monkeypatch.setenv("RAG_LLM__MODEL", "x")  # known: no warning
    monkeypatch.setenv("RAG_DB_STORAGE_OPTIONS__AWS_REGION", "eu-west-1")  # a mapping key
    with caplog.at_level("WARNING", logger="rag_app.settings"):
        load_settings()
    warned = [r.getMessage() for r in caplog.records
              if "RAG_RETRIEVAL" in r.getMessage() or "RAG_INGESTION" in r.getMessage()
              or "RAG_LLM" in r.getMessage() or "RAG_DB" in r.getMessage()]
    assert warned == [
        "unknown environment variable RAG_INGESTION__PARSE_TIMEOUT sets no setting; did you "
        "mean RAG_INGESTION__PARSE_TIMEOUT_S?",
        "unknown environment variable RAG_RETRIEVAL__KK sets no setting; did you mean "
        "RAG_RETRIEVAL__K?"]


SERVER = {"provider": "openai", "base_url": "http://127.0.0.1:11434/v1", "model": "llama3.2"}


def test_the_generator_is_local_unless_a_model_server_is_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    local = load_settings()
    assert (local.llm.provider, local.generation.answer_mode) == ("local", "grounded")
    for name, value in (("PROVIDER", "openai"), ("BASE_URL", SERVER["base_url"]),
                        ("MODEL", "llama3.2"), ("API_KEY", "sk-env-Hq2")):
        monkeypatch.setenv(f"RAG_LLM__{name}", value)
    s = load_settings()
    assert (s.llm.provider, s.llm.base_url, s.llm.model) == ("openai", SERVER["base_url"],
                                                              "llama3.2")
    assert s.llm.api_key.get_secret_value() == "sk-env-Hq2"
    assert "sk-env-Hq2" not in repr(s) + s.model_dump_json()
    # grounded answers need the local model: the default becomes free with a server
    assert s.generation.answer_mode == "free"


@pytest.mark.parametrize(("llm", "generation", "message"), [
    ({"provider": "openai"}, {}, r"needs llm\.base_url \(RAG_LLM__BASE_URL\)"),
    ({**SERVER, "base_url": "localhost:11434"}, {}, r"llm\.base_url = 'localhost:11434' is "
                                                    "not an http"),
    ({**SERVER, "model": BUNDLED_LLM}, {}, r"set llm\.model \(RAG_LLM__MODEL\)"),
    ({"base_url": SERVER["base_url"]}, {}, r"llm\.base_url is for llm\.provider = openai"),
    ({"api_key": "sk-x"}, {}, r"llm\.api_key is for llm\.provider = openai"),
    ({**SERVER, "engine": "fast"}, {}, r"llm\.engine = 'fast' is for llm\.provider = local"),
    ({**SERVER, "adapter": "/some/lora"}, {}, r"llm\.adapter is merged into a local model"),
    (SERVER, {"num_beams": 4}, r"generation\.num_beams = 4 \(RAG_GENERATION__NUM_BEAMS\): "
                               "beam search is not supported by llm.provider = openai"),
    (SERVER, {"repetition_penalty": 1.2}, r"generation\.repetition_penalty = 1\.2"),
    (SERVER, {"do_sample": True, "top_k": 40}, r"generation\.top_k = 40"),
    (SERVER, {"answer_mode": "grounded"}, r"generation\.answer_mode = 'grounded'"),
    (SERVER, {"echo_penalty": 2.0}, r"generation\.echo_penalty = 2\.0"),
])
def test_a_model_server_setting_that_cannot_work_fails_at_start_naming_it(
        llm: dict, generation: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(llm=llm, generation=generation)


def test_a_model_server_takes_the_options_the_openai_api_carries() -> None:
    s = load_settings(llm=SERVER, generation={"do_sample": True, "temperature": 0.4,
                                              "top_p": 0.9, "seed": 1, "max_new_tokens": 99})
    assert (s.generation.temperature, s.generation.top_p, s.generation.seed) == (0.4, 0.9, 1)
    # the local model's defaults that a server does not apply are not refused
    assert (s.generation.top_k, s.generation.stop_on_repeat) == (50, 20)
