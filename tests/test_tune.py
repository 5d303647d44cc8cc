"""`rag tune` and llm.adapter with the real bundled SmolLM2: examples in the chain's prompt
with the loss on the answer only, an exact resume, the adapter merged into the fast decoder,
and one-line errors for bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from rag_app.adapter import apply_adapter
from rag_app.cli import app
from rag_app.errors import ModelLoadError
from rag_app.fast_decoder import FastLlama
from rag_app.prompt import NOT_FOUND, SYSTEM, build_messages
from rag_app.settings import Settings
from rag_app.tune import TuneOptions, load_base, tune
from rag_app.tune_data import IGNORE, clean_text, encode, load_pool, split
from rag_app.tune_shrink import shrink_adapter

WORDS = ["amber", "basalt", "cedar", "dune", "ember", "fjord", "glacier", "harbor", "islet",
         "jungle", "knoll", "lagoon", "mesa", "nectar", "orchard", "prairie", "quarry", "ridge",
         "savanna", "tundra", "upland", "valley", "willow"]
FAST = ["--steps", "2", "--accumulate", "1", "--max-tokens", "256", "--words", "20", "30",
        "--val-examples", "2", "--checkpoint-every", "1", "--lr", "1e-3"]


def _pool(folder: Path, n: int = 48) -> Path:
    """A small synthetic qa-pool: one fact a context amid filler words."""
    folder.mkdir(parents=True, exist_ok=True)
    contexts, questions = [], []
    for i in range(n):
        name, city = f"Land{i}", f"City{i}x"
        filler = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40))
        text = f"<P> {filler} . The capital of {name} is {city} , by law . {filler} </P>"
        contexts.append({"_id": f"c{i}", "title": "", "text": text, "source": "syn"})
        questions.append({"_id": f"q{i}", "context_id": f"c{i}", "source": "syn",
                          "text": f"What is the capital of {name}?", "answers": [city]})
    for name, rows in (("contexts", contexts), ("questions", questions)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pool(tmp_path_factory.mktemp("qa-pool"))


@pytest.fixture(scope="module")
def base(demo_settings: Settings) -> tuple[Path, object]:
    """The converted bundled model's folder and its tokenizer."""
    model, tokenizer, _ = load_base(demo_settings)
    return Path(model.config._name_or_path), tokenizer


def _model(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_clean_text_drops_markers() -> None:
    assert clean_text("<P> It was 2017 -- 18 , ( so ) </P>") == "It was 2017 – 18, (so)"
    assert clean_text("[PAR] [TLE] Boo [SEP] Boo is a film. [PAR] [TLE] Bell [SEP] An actor.") \
        == "Boo is a film.\nAn actor."


def test_examples_follow_the_chains_prompt_and_mask_the_loss(pool: Path, base) -> None:
    questions, contexts = load_pool(pool)
    train, val = split(questions, contexts, 0, 4, words=(20, 30))
    assert val is not None
    assert not {q.context_id for q in train.questions} & {q.context_id for q in val.questions}
    examples = [train.example(i) for i in range(30)]
    assert {e.target == NOT_FOUND for e in examples} == {True, False}
    tokenizer = base[1]
    for e in examples:
        system, user = e.messages
        assert system == {"role": "system", "content": SYSTEM}
        question = user["content"].split("\n", 1)[0].removeprefix("Question: ")
        answer = e.target.rsplit(" [", 1)[0]
        passages = user["content"].split("Sources:\n\n", 1)[1].split("\n\nQuestion:")[0]
        numbered = re.findall(r"^\[(\d+)\] \(\S+\.txt\)$", passages, re.M)
        assert len(numbered) in ((2, 3) if e.gold is None else (3, 4))
        assert "<P>" not in passages and " ," not in passages
        if e.gold is None:
            assert question.split()[-1].rstrip("?") not in passages
            continue
        assert e.target == f"{answer} [{e.gold}]" and answer in passages.split(f"[{e.gold}] ")[1]
        enc = encode(tokenizer, e)
        full = tokenizer.apply_chat_template(
            [*e.messages, {"role": "assistant", "content": e.target}], tokenize=True,
            return_dict=True)["input_ids"]
        assert enc.input_ids.tolist() == list(full)[:len(enc.input_ids)]
        assert tokenizer.decode(enc.input_ids[enc.labels != IGNORE]) == e.target + "<|im_end|>"
        assert (enc.labels[:-1] == IGNORE).sum() > 100  # the prompt carries no loss
    # the same messages the chain builds for these sources
    assert build_messages("What is the capital of Land1?", [])[0]["content"] == SYSTEM


def _tune(args: list[str], out: Path, pool: Path) -> dict:
    result = CliRunner().invoke(app, ["tune", str(out), "--data", str(pool), *args])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_tune_resumes_exactly_where_it_stopped(env, pool: Path, tmp_path: Path) -> None:
    straight = _tune(FAST, tmp_path / "a", pool)
    first = _tune([*FAST, "--until", "1"], tmp_path / "b", pool)  # stopped after step 1
    resumed = _tune([*FAST, "--resume"], tmp_path / "b", pool)
    assert (first["step"], resumed["step"], straight["step"]) == (1, 2, 2)
    assert resumed["examples_seen"] == 2 and resumed["losses"][:1] == first["losses"]
    assert resumed["losses"] == pytest.approx(straight["losses"], abs=1e-4)
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed["val_loss_after"] < resumed["val_loss_before"]
    assert not list((tmp_path / "b").glob("*.partial"))


@pytest.fixture(scope="module")
def adapter(demo_settings: Settings, pool: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Path:
    """An adapter whose LoRA B starts random: it moves the logits from the first step."""
    out = tmp_path_factory.mktemp("adapter")
    tune(demo_settings, TuneOptions(pool, out, steps=1, accumulate=1, max_tokens=256,
                                    words=(20, 30), val_examples=0, lora_b_std=0.05,
                                    progress=False))
    return out


def test_adapter_merged_into_the_fast_decoder_changes_logits_like_peft(
        demo_settings: Settings, base, adapter: Path) -> None:
    from peft import PeftModel

    folder, tokenizer = base
    ids = tokenizer("The capital of Land3 is City3x. The capital of Land3 is",
                    return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        plain = _model(folder)(ids).logits[0, -1]
        reference = PeftModel.from_pretrained(_model(folder), adapter).eval()(ids).logits[0, -1]
    settings = demo_settings.llm.model_copy(update={"adapter": str(adapter)})
    merged = FastLlama(apply_adapter(_model(folder), settings)).prompt_logits(ids[0])[0]
    quantized = FastLlama(_model(folder)).prompt_logits(ids[0])[0]
    change, fast_change = reference - plain, merged - quantized
    assert change.abs().max() > 1.0  # the adapter matters: the test can fail
    assert torch.nn.functional.cosine_similarity(change, fast_change, 0) > 0.9
    # the fast decoder's change is the adapter's: its own int4 error on the base logits
    # (about 0.14 on average, whatever the adapter) cancels out of the difference
    assert (fast_change - change).abs().mean() < 0.5 * change.abs().mean()


def test_a_shrunk_adapter_fits_its_budget_and_peft_loads_its_ranks(base, adapter: Path,
                                                                   tmp_path: Path) -> None:
    from peft import PeftModel

    folder, _ = base
    full = load_file(adapter / "adapter_model.safetensors")
    budget = sum(t.numel() for t in full.values()) * 2 // 2  # half the bf16 bytes
    report = shrink_adapter(adapter, tmp_path, budget)
    assert report.bytes_after <= budget < report.bytes_before
    assert 1 <= min(report.ranks.values()) < max(report.ranks.values()) <= report.rank_before

    def updates(ref: Path) -> dict[str, torch.Tensor]:
        plain = dict(_model(folder).named_parameters())
        merged = PeftModel.from_pretrained(_model(folder), ref).merge_and_unload()
        return {n: p.detach() - plain[n].detach() for n, p in merged.named_parameters()
                if n.endswith("proj.weight")}

    exact, shrunk = updates(adapter), updates(tmp_path)
    error = sum(float(((exact[n] - shrunk[n]) ** 2).sum()) for n in exact)
    energy = sum(float((exact[n] ** 2).sum()) for n in exact)
    assert energy > 0 and 0.3 < report.kept_energy < 0.99
    # what is lost is what the truncated singular values held (bf16 rounding aside)
    assert error / energy == pytest.approx(1 - report.kept_energy, abs=0.02)


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value) and "llm.adapter" in str(e.value)
    return str(e.value)


def test_bad_adapters_give_one_line_errors(demo_settings: Settings, base, adapter: Path,
                                           tmp_path: Path) -> None:
    folder = base[0]

    def load(path: Path) -> str:
        settings = demo_settings.llm.model_copy(update={"adapter": str(path)})
        with pytest.raises(ModelLoadError) as e:
            apply_adapter(_model(folder), settings)
        return _one_line(e)

    assert "no such folder" in load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "not a peft adapter" in load(tmp_path / "empty")
    for name, edit in (("shape", lambda w: {k: v[:, :-1].contiguous() if "lora_A" in k else v
                                            for k, v in w.items()}),
                       ("targets", None), ("corrupt", None)):
        bad = tmp_path / name
        bad.mkdir()
        config = json.loads((adapter / "adapter_config.json").read_text())
        if name == "targets":
            config["target_modules"] = ["wq", "wk"]
        (bad / "adapter_config.json").write_text(json.dumps(config))
        weights = load_file(adapter / "adapter_model.safetensors")
        if name == "corrupt":
            (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
            assert "cannot read" in load(bad)
            continue
        save_file(edit(weights) if edit else weights, bad / "adapter_model.safetensors")
        assert "does not fit llm.model" in load(bad)


def test_tune_bad_inputs_name_the_file(env, pool: Path, tmp_path: Path) -> None:
    empty = tmp_path / "pool"
    empty.mkdir()
    (empty / "contexts.jsonl").write_text("")
    (empty / "questions.jsonl").write_text("")
    result = CliRunner().invoke(app, ["tune", str(tmp_path / "o"), "--data", str(empty)])
    assert result.exit_code == 1 and "contexts.jsonl: empty" in result.output
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(app, ["tune", str(out), "--data", str(pool), *FAST, "--resume"])
    assert result.exit_code == 1 and "state.pt: corrupt checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1
