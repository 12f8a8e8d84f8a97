"""Sources (our schema, HER-Dataset forms, CoSER, ShareGPT), the grain pipeline, TFDS, and the CLI."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from her_jax.data.format import ENVIRONMENT
from her_jax.data.pipeline import DataConfig, Pipeline
from her_jax.data.sources import SAMPLE_CORPUS, load

PLAN = "<system_thinking>Context: tense. Goal: hold firm. Plan: one line.</system_thinking>"


def scene_record(sid="r1", **over):
    rec = {"id": sid, "book": "The Salt Orchard", "scenario": "A shed at dusk.",
           "characters": {"Ines": {"profile": "keeper", "inner_thoughts": "tired"}, "Tomas": {"profile": "agent"}},
           "turns": [{"speaker": "Tomas", "text": f"{PLAN}Tomas: <role_action>sets papers down</role_action>Sign."},
                     {"speaker": ENVIRONMENT, "text": "Rain."},
                     {"speaker": "Ines", "text": f"{PLAN}Ines: <role_thinking>no</role_thinking>Not tonight."},
                     {"speaker": "Tomas", "text": f"{PLAN}Tomas: Then tomorrow."},
                     {"speaker": "Ines", "text": f"{PLAN}Ines: <role_action>turns away</role_action>"}]}
    rec.update(over)
    return rec


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def test_our_schema_with_bad_records_counted_by_reason(tmp_path):
    bad_turn = scene_record("bad1")
    bad_turn["turns"][2]["text"] = f"{PLAN}Ines: <role_thinking>never closed"
    path = write_jsonl(tmp_path / "scenes.jsonl", [
        scene_record("ok1"), "{not json", {"hello": 1}, bad_turn,
        scene_record("bad2", turns="nope"), scene_record("bad3", targets=["Nobody"]),
        scene_record("ok2", targets=["Ines"]),
    ])
    units, report = load([path])
    assert [u.id for u, _ in units] == ["ok1", "ok2"]
    assert [len(c) for _, c in units] == [2, 1]
    assert report.records == 7 and report.conversations == 3 and report.turns == 6
    assert report.rejected == {"invalid_json": 1, "unknown_record": 1, "unclosed_tag": 1, "missing_field": 1,
                               "target_not_speaking": 1}
    assert "record bad1: turn 2 (Ines): <role_thinking> is never closed" in report.examples["unclosed_tag"]
    assert "scenes.jsonl:2" in report.examples["invalid_json"]


def test_her_messages_single_turn_records_regroup_into_one_conversation(tmp_path):
    system = {"role": "system", "content": "You are Ines from The Salt Orchard.\n\n===Requirements===\n..."}
    user = lambda t: {"role": "user", "content": t}
    plain = ["Ines: <role_action>nods</role_action>Yes.", "Ines: No.", "Ines: <role_thinking>hm</role_thinking>Maybe."]
    records = []
    for k in range(3):  # sample k ends with assistant turn k, which carries its system thinking
        msgs = [system]
        for j in range(k + 1):
            msgs.append(user(f"Tomas: question {j}"))
            msgs.append({"role": "assistant", "content": (f"<system_thinking>plan {j}</system_thinking>" if j == k else "")
                         + plain[j]})
        records.append({"trace_id": f"c1_turn_{k}", "original_trace_id": "c1", "turn_index": k, "messages": msgs})
    multi = {"trace_id": "c2", "messages": records[-1]["messages"]}  # multi-turn form: only the last has a plan
    units, report = load([write_jsonl(tmp_path / "her.jsonl", [*records[::-1], multi])])
    assert not report.rejected
    convs = {c.id: c for _, cs in units for c in cs}
    grouped = convs["c1"]
    turns = [m for m in grouped.messages if m.role == "assistant"]
    assert [t.turn.system_thinking for t in turns] == ["plan 0", "plan 1", "plan 2"] and grouped.num_turns == 3
    assert grouped.character == "Ines"
    last_only = convs["c2"]
    assert [m.train for m in last_only.messages if m.role == "assistant"] == [False, False, True]


def test_her_full_record(tmp_path):
    rec = {"trace_id_book_chapter": "b_1_0_0",
           "conversation": [{"dialogues": [{"character": "Ines", "origin_id": [0], "sys_thinking": "plan A"},
                                           {"character": "Tomas", "origin_id": [1]},
                                           {"character": "Ines", "origin_id": [2], "sys_thinking": "plan B"}]}],
           "training_samples": {"Ines": [
               {"role": "system", "content": "You are Ines from B."},
               {"role": "assistant", "content": "Ines: First.", "origin_id": [0]},
               {"role": "user", "content": "Tomas: Well?", "origin_id": [1]},
               {"role": "assistant", "content": "Ines: <role_action>shrugs</role_action>Second.", "origin_id": [2]}]}}
    units, report = load([write_jsonl(tmp_path / "full.jsonl", [rec])])
    (conv,) = units[0][1]
    assert [m.turn.system_thinking for m in conv.messages if m.role == "assistant"] == ["plan A", "plan B"]


def test_coser_sources(shared_data):
    coser = os.path.join(shared_data, "coser")
    units, report = load([os.path.join(coser, "final"), os.path.join(coser, "test_set.json"),
                          os.path.join(coser, "sft_sharegpt.json")])
    kinds = collections.Counter(u.kind for u, _ in units)
    assert kinds["coser_scene"] == 200 and kinds["sharegpt"] == 420 and kinds["coser_book"] > 30
    # Only the 14 next-speaker-prediction records of the ShareGPT file are not role-play.
    assert report.rejected == {"unknown_character": 14}
    scene = next(cs for u, cs in units if u.kind == "coser_scene")[0]
    system = scene.messages[0].content
    assert system.startswith(f"You are {scene.character} from ") and "===Current Scenario===" in system
    first = next(m for m in scene.messages if m.role == "assistant").turn
    assert any(s.kind in ("role_thinking", "role_action") for s in first.segments)  # [..] and (..) converted


def _docs(rows):
    """The token sequences of all docs in some rows, as a multiset."""
    out = collections.Counter()
    for batch in rows:
        for tokens, doc in zip(batch["tokens"], batch["doc_ids"]):
            for d in np.unique(doc[doc > 0]):
                out[tokens[doc == d].tobytes()] += 1
    return out


def test_pipeline_is_deterministic_sharded_and_resumable(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [scene_record(f"r{i}", scenario=f"Shed number {i}.") for i in range(12)])
    cfg = DataConfig(sources=(path,), seq_len=1024, batch_size=2, num_packing_bins=2, seed=3)
    batches = list(Pipeline(cfg, 0, 1))
    again = list(Pipeline(cfg, 0, 1))
    assert len(batches) >= 3 and all(np.array_equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)
    assert batches[0]["tokens"].shape == (2, 1024) and batches[0]["tokens"].dtype == np.int32
    other = list(Pipeline(DataConfig(**{**cfg.__dict__, "seed": 4}), 0, 1))
    assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, other))

    # Two processes: disjoint halves that together hold every conversation exactly once.
    halves = [list(Pipeline(DataConfig(**{**cfg.__dict__, "batch_size": 2}), i, 2)) for i in range(2)]
    assert sum(b["tokens"].shape[0] for h in halves for b in h) >= 2
    one, two = _docs(halves[0]), _docs(halves[1])
    assert not set(one) & set(two)
    assert one + two == _docs(list(Pipeline(DataConfig(**{**cfg.__dict__, "batch_size": 1}), 0, 1)))

    # Resume from a saved iterator state.
    it = iter(Pipeline(cfg, 0, 1))
    next(it)
    state = it.get_state()
    rest = list(it)
    resumed = iter(Pipeline(cfg, 0, 1))
    resumed.set_state(state)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(rest, list(resumed)) for k in a)


def test_pipeline_counts_turns_too_long_for_the_rows(tmp_path):
    long_text = "word " * 400
    rec = scene_record("long")
    rec["turns"][0]["text"] = f"{PLAN}Tomas: {long_text}"
    path = write_jsonl(tmp_path / "s.jsonl", [rec, scene_record("short")])
    pipe = Pipeline(DataConfig(sources=(path,), seq_len=400, batch_size=1, num_packing_bins=1), 0, 1)
    rows = list(pipe)
    assert rows and pipe.report.rejected["too_long"] >= 1
    assert "record long/" in pipe.report.examples["too_long"]


def test_prepared_tfds_dataset_gives_the_same_data(tmp_path):
    from her_jax.data.prepared import prepare

    path = write_jsonl(tmp_path / "s.jsonl", [scene_record(f"r{i}") for i in range(5)] + ["{oops"])
    report = prepare([path], str(tmp_path / "prepared"))
    assert report.units == 5 and report.rejected == {"invalid_json": 1}
    assert os.path.exists(tmp_path / "prepared" / "her_jax_prepared.json")
    assert any(f.endswith(".array_record-00000-of-00001") for _, _, fs in os.walk(tmp_path / "prepared") for f in fs)
    cfg = DataConfig(sources=(path,), seq_len=2048, batch_size=1, shuffle=False)
    raw = list(Pipeline(cfg, 0, 1))
    prepared = list(Pipeline(DataConfig(**{**cfg.__dict__, "sources": (str(tmp_path / "prepared"),)}), 0, 1))
    assert _docs(raw) == _docs(prepared)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="data.mode"):
        DataConfig(mode="triple_view")
    with pytest.raises(ValueError, match="data.seq_len"):
        DataConfig(seq_len=0)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        Pipeline(DataConfig(batch_size=4), 0, 3)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        Pipeline(DataConfig(sources=("/nonexistent.jsonl",)), 0, 1)


# -- the bundled corpus and the CLI ---------------------------------------------------------------

def test_sample_corpus_is_valid_dual_layer_data():
    units, report = load(["sample"])
    assert not report.rejected, report.examples
    convs = [c for _, cs in units for c in cs]
    assert len(units) >= 12 and len(convs) >= 24
    turns = [m.turn for c in convs for m in c.messages if m.role == "assistant" and m.train]
    assert all(t.system_thinking for t in turns)
    kinds = collections.Counter(s.kind for t in turns for s in t.segments)
    assert min(kinds.values()) > 50
    assert os.path.dirname(SAMPLE_CORPUS).endswith(os.path.join("her_jax", "data"))


def test_cli_inspect_prepare_show(tmp_path, capsys):
    from her_jax.data.__main__ import main

    assert main(["inspect", "sample", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rejected_total"] == 0 and summary["turns_with_system_thinking"] == summary["turns"]
    assert summary["trained_tokens_per_layer"]["system_thinking"] > 0 and summary["token_ratio"] > 1.5
    assert main(["inspect", "sample"]) == 0
    assert "trained tokens per layer" in capsys.readouterr().out
    assert main(["prepare", "sample", "--out", str(tmp_path / "p")]) == 0
    assert json.loads(capsys.readouterr().out)["units"] == summary["units"]
    assert main(["show", "sample", "--index", "1", "--turn", "0"]) == 0
    assert "\x1b[" in capsys.readouterr().out
    assert main(["show", "sample", "--html", str(tmp_path / "s.html")]) == 0
    assert 'title="system_thinking"' in (tmp_path / "s.html").read_text()
    assert main(["show", "sample", "--index", "9999"]) == 1
    assert main(["inspect", str(tmp_path / "missing.jsonl")]) == 1


def test_rendering_does_not_depend_on_the_hash_seed(shared_data):
    import subprocess
    import sys

    code = ("import hashlib, sys; from her_jax.data.sources import load; h = hashlib.sha256()\n"
            "for _, cs in load(sys.argv[1:])[0]:\n"
            "    for c in cs:\n"
            "        for m in c.messages: h.update((m.content or m.turn.render()).encode())\n"
            "print(h.hexdigest())")
    files = [os.path.join(shared_data, "coser", "test_set.json"), os.path.join(shared_data, "coser", "final")]
    digests = {subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(digests) == 1
