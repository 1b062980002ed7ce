"""openpi's PaliGemma prompt formatting over a SentencePiece model given by path (openpi.md §4.3).

    cleaned = prompt.strip() with "_" and "\\n" replaced by spaces
    Pi0 format:            [bos] + encode(cleaned) + encode("\\n")      ("\\n" = start of answer)
    Pi0.5 discrete state:  [bos] + encode(f"Task: {cleaned}, State: {s};\\nAction: ")
                           s = space-joined digitize(state, linspace(-1, 1, 257)[:-1]) - 1 (normalized, unpadded)

Padded with id 0 to `max_len` (mask True = real token), truncated with a warning when longer. Ids
follow Gemma's convention: pad 0, eos 1, bos 2, unk 3. Host-side (numpy) only; nothing is downloaded:
the PaliGemma model file (`paligemma_tokenizer.model`) must be given by path, or a small model trained
with `train_sentencepiece` on the dataset's task strings (same ids, same loading path).
"""

from __future__ import annotations

import io
import logging
import pathlib
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm
from jaxtyping import Bool, Float, Int

from eqx_energy._files import atomic_write

logger = logging.getLogger(__name__)


class PaligemmaTokenizer:
    """`tokenize(prompt, state=None) -> (tokens int32 (max_len,), mask bool (max_len,))`."""

    def __init__(self, model_path: str | pathlib.Path, max_len: int = 48):
        path = pathlib.Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"SentencePiece model {path} not found. Provide the PaliGemma tokenizer file "
                "(gs://big_vision/paligemma_tokenizer.model, downloaded beforehand: nothing is fetched at run time) "
                "or a small model made with eqx_energy.policy.tokenizer.train_sentencepiece(task_strings, path, vocab_size)"
            )
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (bos + one token), got {max_len}")
        self.model_path = path
        self.max_len = max_len
        self._sp = spm.SentencePieceProcessor(model_file=str(path))

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def tokenize(self, prompt: str, state: Float[np.ndarray, " n"] | None = None) -> tuple[Int[np.ndarray, " l"], Bool[np.ndarray, " l"]]:
        cleaned = prompt.strip().replace("_", " ").replace("\n", " ")
        if state is not None:
            bins = np.digitize(np.asarray(state), bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
            text = f"Task: {cleaned}, State: {' '.join(map(str, bins))};\nAction: "
            tokens = self._sp.encode(text, add_bos=True)
        else:
            tokens = self._sp.encode(cleaned, add_bos=True) + self._sp.encode("\n")
        if len(tokens) > self.max_len:
            logger.warning("prompt has %d tokens > max_len=%d; truncating (raise max_token_len)", len(tokens), self.max_len)
            tokens = tokens[: self.max_len]
        n = len(tokens)
        out = np.zeros((self.max_len,), np.int32)
        out[:n] = tokens
        return out, np.arange(self.max_len) < n

    def decode(self, tokens: Int[np.ndarray, " l"], mask: Bool[np.ndarray, " l"] | None = None) -> str:
        """Text of the valid tokens (bos/pad dropped)."""
        ids = [int(t) for t, m in zip(tokens, np.ones(len(tokens), bool) if mask is None else mask) if m]
        return self._sp.decode(ids)


_STATE_BINS = tuple(str(i) for i in range(-1, 256))  # the discrete-state values, one piece each


def train_sentencepiece(texts: Iterable[str], out_path: str | pathlib.Path, vocab_size: int = 256, *,
                        state_pieces: bool = False) -> pathlib.Path:
    """Train a small SentencePiece model on `texts` (e.g. a dataset's task strings) and write it to `out_path`.

    Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and text handling ("\\n" its own piece, identity
    normalisation, no dummy-prefix space); `hard_vocab_limit=False`, so on a small corpus the vocabulary
    may come out smaller than `vocab_size`. `state_pieces` makes each discrete-state bin (-1..255) one
    piece (vocab_size >= 512 then): PaliGemma's tokenizer splits numbers into digits, which a 2B model reads
    fine, but a CPU-sized model learns the state far faster from one token per value.
    Returns the path of the `.model` file, written atomically.
    """
    if state_pieces and vocab_size < 512:
        raise ValueError(f"state_pieces needs vocab_size >= 512 (257 bin pieces + the text's); got {vocab_size}")
    corpus = [t.strip().replace("_", " ").replace("\n", " ") for t in texts]
    corpus = [t for t in corpus if t]
    if not corpus:
        raise ValueError("train_sentencepiece needs at least one non-empty text; got none")
    # The discrete-state format's fixed words, so Pi0.5-style prompts tokenize without unk.
    corpus += ["Task: , State: ;", "Action: ", " ".join(_STATE_BINS)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",  # whole words on a few task strings (unigram stays near character level)
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        user_defined_symbols=["\n", *(_STATE_BINS if state_pieces else ())],
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return atomic_write(out_path, model.getvalue())
