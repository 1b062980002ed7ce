"""Prompt formatting (openpi's Pi0 and Pi0.5 discrete-state formats) over a project-trained SentencePiece model."""

import numpy as np
import pytest

from eqx_energy.policy.tokenizer import PaligemmaTokenizer, train_sentencepiece

TASKS = ["pick up the red block", "open_the drawer", "put the bowl on the plate", "close the microwave door"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_sentencepiece(TASKS * 3, tmp_path_factory.mktemp("sp") / "tasks.model", vocab_size=200)


def test_pi0_format_bos_prompt_newline_and_padding(model_path):
    tok = PaligemmaTokenizer(model_path, max_len=48)
    tokens, mask = tok.tokenize("  open_the drawer\n")
    sp = tok._sp
    want = [2] + sp.encode("open the drawer") + sp.encode("\n")
    n = len(want)
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape == (48,)
    np.testing.assert_array_equal(tokens[:n], want)
    assert mask[:n].all() and not mask[n:].any() and (tokens[n:] == 0).all()
    assert sp.encode("\n") == [sp.piece_to_id("\n")]  # the "start of answer" token is one piece
    assert tok.decode(tokens, mask) == "open the drawer\n"


def test_pi05_discrete_state_format(model_path):
    tok = PaligemmaTokenizer(model_path, max_len=64)
    state = np.array([-1.0, 0.0, 0.999, 2.0])
    tokens, mask = tok.tokenize("pick up the red block", state=state)
    assert tokens[0] == 2
    assert tok.decode(tokens, mask) == "Task: pick up the red block, State: 0 128 255 255;\nAction: "
    assert 3 not in tokens[mask]  # no unknown pieces: the digits and fixed words are in the vocabulary


def test_truncation_and_special_ids(model_path, caplog):
    tok = PaligemmaTokenizer(model_path, max_len=5)
    tokens, mask = tok.tokenize("put the bowl on the plate")
    assert mask.all() and tokens[0] == 2 and "truncating" in caplog.text
    assert [tok._sp.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="paligemma_tokenizer.model"):
        PaligemmaTokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="non-empty"):
        train_sentencepiece(["  "], tmp_path / "x.model")


def test_state_pieces_make_each_state_bin_one_token(tmp_path):
    path = train_sentencepiece(TASKS, tmp_path / "state.model", vocab_size=512, state_pieces=True)
    tok = PaligemmaTokenizer(path, max_len=96)
    state = np.linspace(-1.2, 1.2, 21)
    tokens, mask = tok.tokenize(TASKS[0], state)
    pieces = [tok._sp.id_to_piece(int(t)) for t in tokens[mask]]
    bins = np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1
    assert [p for p in pieces if p.lstrip("-").isdigit()] == [str(b) for b in bins]
    assert tok.decode(tokens, mask).endswith(f"State: {' '.join(map(str, bins))};\nAction: ")
    with pytest.raises(ValueError, match="vocab_size >= 512"):
        train_sentencepiece(TASKS, tmp_path / "small.model", vocab_size=256, state_pieces=True)
