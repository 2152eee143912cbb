"""Text sources and calibration windows: protocol rows, offline layout, local files, errors, sampling."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llama_pruning.data import (
    DATA_ENV,
    DataError,
    get_calibration_samples,
    get_eval_text,
    get_text_rows,
    load_text,
    sources,
    tokenize_text,
)
from tests.conftest import SHARED_DATA


def word_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A whitespace word-level fast tokenizer over the words of `text` (id 0 = unknown word)."""
    vocab = {"[UNK]": 0}
    for word in text.split():
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture
def offline_only(monkeypatch):
    """Make any attempt to reach the hub fail at once (the real one retries for ~25 s offline)."""

    def unreachable(info, split):
        raise ConnectionError(f"Couldn't reach {info.hf_path!r} on the Hub")

    monkeypatch.setattr(sources, "_hub_rows", unreachable)


def test_wikitext_test_rows_follow_protocol(data_dir):
    path = data_dir / "wikitext2" / "wiki.test.raw"
    expected = [line for line in path.read_bytes().decode("utf-8").replace("\r\n", "\n").split("\n") if line.strip()]
    source = load_text("wikitext2", "evaluation")
    assert source.label == "wikitext2 (wikitext-2-raw-v1)"
    assert source.origin == "wikitext2/wiki.test.raw (packaged with llama-pruning)"
    assert source.rows == expected
    assert len(source.rows) == 2891
    assert source.rows[0] == " = Robert Boulter = "
    assert not any("\n" in row or "\r" in row for row in source.rows)
    assert get_eval_text("wikitext2") == "\n\n".join(expected)


def test_wikitext_calibration_reads_valid_tokens_without_bom(data_dir):
    source = load_text("wikitext2", "calibration")
    assert source.origin == "wikitext2/wiki.valid.tokens (packaged with llama-pruning)"
    assert source.rows[0] == " = Homarus gammarus = "  # BOM dropped, the whitespace-only row before it skipped
    assert all(row.strip() for row in source.rows)
    assert get_text_rows("wikitext2") == source.rows


def test_calibration_windows_exact_distinct_deterministic(data_dir):
    text = load_text("wikitext2", "calibration").text
    tokenizer = word_tokenizer(text)
    ids = tokenize_text(tokenizer, text)
    seq_len = 64
    first = get_calibration_samples(tokenizer, "wikitext2", 16, seq_len, seed=0)
    assert first.dtype == torch.long and first.shape == (16, seq_len)
    assert len({tuple(row.tolist()) for row in first}) == 16
    assert torch.equal(first, get_calibration_samples(tokenizer, "wikitext2", 16, seq_len, seed=0))
    other = get_calibration_samples(tokenizer, "wikitext2", 16, seq_len, seed=1)
    assert not torch.equal(first, other)
    starts = set()
    for row in first:  # each window is one non-overlapping slice of the tokenized calibration text
        matches = [s for s in range(0, ids.numel() - seq_len + 1, seq_len) if torch.equal(ids[s:s + seq_len], row)]
        assert matches
        starts.add(matches[0])
    assert len(starts) == 16


@pytest.mark.slow
def test_calibration_text_never_comes_from_the_test_split(smollm2, data_dir):
    _, tokenizer = smollm2
    def joined(name: str) -> str:
        with open(data_dir / "wikitext2" / name, encoding="utf-8-sig") as handle:
            return "\n\n".join(line.rstrip("\n") for line in handle if line.strip())

    valid, test = joined("wiki.valid.tokens"), joined("wiki.test.raw")
    windows = get_calibration_samples(tokenizer, "wikitext2", 8, 128, seed=3)
    for row in windows:
        core = tokenizer.decode(row)[2:-2]  # byte-level BPE may split a character at the window edges
        assert core in valid
        assert core not in test


def test_local_txt_and_jsonl_sources(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_bytes(b"first line\r\n\r\n  \nsecond line\nthird\n")
    assert load_text(str(txt)).rows == ["first line", "second line", "third"]
    assert load_text(str(txt)).text == "first line\n\nsecond line\n\nthird"
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["alpha beta\n", "", "gamma"])))
    source = load_text(str(jsonl), "calibration")
    assert source.label == str(jsonl) and source.rows == ["alpha beta", "gamma"]
    packed = tmp_path / "docs.json.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "zipped doc"}) + "\n")
    assert load_text(str(packed)).rows == ["zipped doc"]


def test_calibration_from_a_local_file(tmp_path):
    rows = [" ".join(f"w{i}_{j}" for j in range(7)) for i in range(40)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(rows) + "\n")
    tokenizer = word_tokenizer(" ".join(rows))
    ids = tokenize_text(tokenizer, "\n\n".join(rows))
    windows = get_calibration_samples(tokenizer, str(path), num_samples=35, seq_len=8, seed=5)
    assert windows.shape == (35, 8)
    slots = ids.view(-1, 8)
    assert sorted(windows.tolist()) == sorted(slots.tolist())  # all 35 slots, each exactly once
    with pytest.raises(DataError, match="too few for 36 samples"):
        get_calibration_samples(tokenizer, str(path), num_samples=36, seq_len=8)


def test_repeated_text_still_gives_distinct_windows(tmp_path):
    path = tmp_path / "repeats.txt"
    path.write_text("a b c d\n" * 10 + "e f g h\n")
    tokenizer = word_tokenizer("a b c d e f g h")
    assert get_calibration_samples(tokenizer, str(path), 2, 4).tolist() in ([[1, 2, 3, 4], [5, 6, 7, 8]],
                                                                            [[5, 6, 7, 8], [1, 2, 3, 4]])
    with pytest.raises(DataError, match="2 distinct windows"):
        get_calibration_samples(tokenizer, str(path), 3, 4)


def test_offline_layout_for_ptb_and_c4(tmp_path, monkeypatch, offline_only):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" no it was n't black monday \n but while the new york \n\n")
    (tmp_path / "c4").mkdir()
    with gzip.open(tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz", "wt", encoding="utf-8") as handle:
        for i in range(1200):
            handle.write(json.dumps({"text": f"doc {i}", "url": "u"}) + "\n")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    ptb = load_text("ptb")
    assert ptb.label == "ptb (ptb_text_only)"
    assert ptb.text == "no it was n't black monday but while the new york"
    c4 = load_text("c4")
    assert c4.rows == [f"doc {i}" for i in range(1100)]  # the first 1,100 validation documents
    with pytest.raises(DataError, match="ptb.train.txt"):
        load_text("ptb", "calibration")


def test_errors_are_one_clear_line(tmp_path, monkeypatch, offline_only, no_packaged_data, capsys):
    with pytest.raises(DataError, match="unknown dataset 'wikitext3': choose one of wikitext2, ptb, c4"):
        load_text("wikitext3")
    with pytest.raises(DataError, match="text file not found"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown split"):
        load_text("wikitext2", "train")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(DataError) as err:
        load_text("wikitext2", "calibration")
    message = str(err.value)
    assert "\n" not in message
    assert "no offline wiki.valid.tokens" in message and "wiki.train.raw" not in message
    assert f"not in {DATA_ENV}={tmp_path} (expected {tmp_path / 'wikitext2' / 'wiki.valid.tokens'})" in message
    assert "pass --dataset with a local .txt/.jsonl file" in message
    # the hub attempt is announced once, before it starts
    assert capsys.readouterr().err.count("trying the Hugging Face hub: datasets.load_dataset('wikitext'") == 1
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=f"no offline wiki.test.raw \\({DATA_ENV}={tmp_path / 'nowhere'} does not exist\\)"):
        load_text("wikitext2")
    monkeypatch.delenv(DATA_ENV)
    with pytest.raises(DataError, match=f"{DATA_ENV} is not set") as err:
        load_text("wikitext2")
    assert "--dataset" not in str(err.value)  # evaluation text does not come from --dataset
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no string field 'text'"):
        load_text(str(bad))
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')  # blank lines are skipped but counted
    with pytest.raises(DataError, match=r"bad.jsonl:3 is not a JSON object"):
        load_text(str(bad))


def test_packaged_wikitext_is_the_benchmark_data_byte_for_byte():
    """The shipped files decompress to the exact bytes recorded (and to ../shared/data's copy when it is there)."""
    for split in ("calibration", "evaluation"):
        packaged = sources.DATASETS["wikitext2"].splits[split].packaged
        raw = lzma.decompress(sources.packaged_data().joinpath(f"{packaged.name}.xz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() == packaged.sha256
        if SHARED_DATA.is_dir():
            assert raw == (SHARED_DATA / packaged.name).read_bytes()
    assert sources.packaged_data().joinpath("wikitext2/LICENSE").read_text().count("CC BY-SA 3.0") == 1


def test_packaged_data_comes_first_and_equals_the_offline_folder(data_dir, monkeypatch, offline_only):
    reference = SHARED_DATA if SHARED_DATA.is_dir() else data_dir
    monkeypatch.setenv(DATA_ENV, str(reference))
    packaged = {split: load_text("wikitext2", split) for split in ("calibration", "evaluation")}
    assert all(source.origin.endswith("(packaged with llama-pruning)") for source in packaged.values())
    monkeypatch.setattr(sources, "packaged_data", lambda: reference / "absent")
    for split, source in packaged.items():
        offline = load_text("wikitext2", split)
        assert offline.origin == str(reference / sources.DATASETS["wikitext2"].splits[split].offline_files[0])
        assert offline.rows == source.rows and offline.text == source.text


def test_corrupt_packaged_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw.xz").write_bytes(lzma.compress(b" = Robert Boulter = \r\n"))
    monkeypatch.setattr(sources, "packaged_data", lambda: tmp_path)
    with pytest.raises(DataError, match=r"packaged wikitext2/wiki.test.raw is corrupt .*reinstall llama-pruning"):
        load_text("wikitext2")


@pytest.mark.slow
def test_packaged_windows_equal_the_offline_folder_windows(smollm2, data_dir, monkeypatch):
    """Calibration windows and evaluation windows (the PPL protocol) are identical tensors from either source."""
    from llama_pruning.data import split_windows

    _, tokenizer = smollm2
    monkeypatch.setenv(DATA_ENV, str(SHARED_DATA if SHARED_DATA.is_dir() else data_dir))

    def windows() -> tuple[torch.Tensor, torch.Tensor]:
        calibration = get_calibration_samples(tokenizer, "wikitext2", 256, 128, seed=0)
        return calibration, split_windows(tokenize_text(tokenizer, get_eval_text("wikitext2")), 128)

    calibration, evaluation = windows()
    monkeypatch.setattr(sources, "packaged_data", lambda: data_dir / "absent")
    offline_calibration, offline_evaluation = windows()
    assert calibration.shape == (256, 128) and evaluation.shape[0] > 128
    assert torch.equal(calibration, offline_calibration) and torch.equal(evaluation, offline_evaluation)


def test_calibration_refuses_an_evaluation_file(data_dir):
    with pytest.raises(DataError, match="evaluation split"):
        load_text(str(data_dir / "wikitext2" / "wiki.test.raw"), "calibration")
