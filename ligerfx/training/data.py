"""Training data: JSONL corpora -> validated records -> tokens with loss masks -> packed fixed-length chunks.

Record schemas, detected per file from its first record and then required of every line:

* ``alpaca``: ``instruction`` (non-empty str), ``output`` (str), ``input`` (str, optional). Rendered with the
  Alpaca prompt template (the Stanford / LoLCATs / Liger one); loss on the response only.
* ``prompt_completion`` (T0 mixture): ``prompt`` + ``completion`` (a trailing ``<|endoftext|>`` is dropped); loss on
  the completion only.
* ``text`` (Wikipedia): ``text``; loss on every token.

Every sample is ``[BOS] prompt response [EOS]`` (BOS only when the tokenizer has one); labels are ``-100`` on BOS and
prompt, the token id on response and EOS. Samples are shuffled per epoch (seeded), concatenated and cut into
``seq_len`` chunks, the remainder dropped: packing across samples without document masking, as the Liger recipe does
(``packing="concat"``). ``packing="aligned"`` starts every chunk at a sample's first token (its BOS), so the first
tokens of a chunk -- the attention sinks of the window branch -- are what they are at inference; samples fill the chunk
in order and the one that overflows it is cut there (its tail is not trained on); a sample longer than ``seq_len``
gives ``seq_len`` pieces and its last piece is filled up the same way.
Several corpora mix by chunk: each global chunk index draws its source from a seeded schedule with the given weights,
and each source cycles through its own epochs. Everything is a pure function of (files, tokenizer, seed), so a resumed
run can seek to any chunk index.
"""
from __future__ import annotations

import bz2
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

IGNORE_INDEX = -100
PACKINGS = ("concat", "aligned")

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ENDOFTEXT = "<|endoftext|>"

# schema -> (required string fields, optional string fields)
SCHEMAS = {
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}

__all__ = ["DataError", "Record", "read_records", "alpaca_prompt", "tokenize_records", "Source", "ChunkStream",
           "IGNORE_INDEX", "PACKINGS", "parse_count", "pack_in_order"]


class DataError(ValueError):
    """A malformed data file. The message starts with ``file:line:``."""


@dataclass(frozen=True)
class Record:
    """One training sample as text: ``prompt`` gets no loss, ``response`` does."""

    prompt: str
    response: str


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _open_binary(path: Path):
    name = path.name
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def _detect_schema(obj: dict) -> Optional[str]:
    if "instruction" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _to_record(schema: str, obj: dict) -> Record:
    if schema == "alpaca":
        return Record(alpaca_prompt(obj["instruction"], obj.get("input", "")), obj["output"])
    if schema == "prompt_completion":
        completion = obj["completion"]
        if completion.endswith(ENDOFTEXT):
            completion = completion[: -len(ENDOFTEXT)]
        return Record(obj["prompt"], completion)
    return Record("", obj["text"])


def read_records(path, limit: Optional[int] = None) -> tuple[str, list[Record]]:
    """Read and validate every line of a ``.jsonl`` / ``.jsonl.xz`` / ``.jsonl.bz2`` file.

    Returns ``(schema, records)``. Blank lines are skipped. Any malformed line raises :class:`DataError` with
    ``file:line: what was wrong``. ``limit`` stops after that many records (for smoke tests).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    schema: Optional[str] = None
    records: list[Record] = []
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                if schema is None:
                    schema = _detect_schema(obj)
                    if schema is None:
                        raise DataError(
                            f"{where}: unknown record type with fields {sorted(obj)}; expected "
                            "instruction/input/output (alpaca), prompt/completion, or text"
                        )
                required, optional = SCHEMAS[schema]
                for key in required:
                    if key not in obj:
                        raise DataError(f"{where}: field {key!r} missing ({schema} records need {list(required)})")
                for key in required + optional:
                    if key in obj and not isinstance(obj[key], str):
                        raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
                if schema == "alpaca" and not obj["instruction"].strip():
                    raise DataError(f"{where}: field 'instruction' is empty")
                if schema == "text" and not obj["text"].strip():
                    raise DataError(f"{where}: field 'text' is empty")
                records.append(_to_record(schema, obj))
                if limit is not None and len(records) >= limit:
                    break
    except (lzma.LZMAError, EOFError, OSError) as e:
        raise DataError(f"{path}:{lineno + 1}: cannot read ({type(e).__name__}: {e})") from None
    if not records:
        raise DataError(f"{path}: no records")
    return schema, records


def tokenize_records(records: Sequence[Record], tokenizer, batch_size: int = 1024) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each record -> ``(input_ids, labels)`` int32 arrays: ``[BOS] prompt response [EOS]``, loss on response + EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; samples need an end marker")
    head = [] if bos is None else [bos]
    out = []
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        prompts = tokenizer([r.prompt for r in batch], add_special_tokens=False)["input_ids"]
        responses = tokenizer([r.response for r in batch], add_special_tokens=False)["input_ids"]
        for p, r in zip(prompts, responses):
            ids = np.asarray(head + list(p) + list(r) + [eos], dtype=np.int32)
            labels = ids.copy()
            labels[: len(head) + len(p)] = IGNORE_INDEX
            out.append((ids, labels))
    return out


class Source:
    """One corpus as an endless, seekable stream of packed chunks (epoch after epoch, reshuffled each epoch)."""

    def __init__(self, name: str, samples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, seed: int,
                 packing: str = "concat"):
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r}: expected one of {PACKINGS}")
        self.name, self.samples, self.seq_len, self.seed, self.packing = name, samples, seq_len, seed, packing
        self.tokens_per_epoch = int(sum(len(ids) for ids, _ in samples))
        self._epoch: Optional[int] = None
        self._ids = self._labels = None
        # aligned packing gives a different chunk count per epoch (it depends on the order): epoch e starts at global
        # chunk self._starts[e]; chunks_per_epoch is epoch 0's count (for logs and --epochs)
        self._starts = [0]
        self._spans: dict = {}  # epoch -> its aligned chunks, kept from counting until packing
        if packing == "aligned":
            self.chunks_per_epoch = len(self._aligned_spans(0))
        else:
            self.chunks_per_epoch = self.tokens_per_epoch // seq_len
        if self.chunks_per_epoch == 0:
            raise DataError(f"{name}: {self.tokens_per_epoch} tokens in all, fewer than one {seq_len}-token chunk")

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))

    def _aligned_spans(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        """Epoch ``epoch``'s chunks as lists of ``(sample, start, stop)`` slices; every chunk starts at a sample's
        start (or at a ``seq_len`` boundary inside a longer sample) and holds exactly ``seq_len`` tokens; an
        incomplete last chunk is dropped. Cached per epoch (only the latest two are kept)."""
        if epoch in self._spans:
            return self._spans[epoch]
        L = self.seq_len
        chunks, cur, used = [], [], 0
        for i in self._order(epoch):
            n = len(self.samples[i][0])
            start = 0
            if not cur:  # a sample opens the chunk: full pieces of a long one first
                while n - start >= L:
                    chunks.append([(i, start, start + L)])
                    start += L
                if start == n:
                    continue
            take = min(n - start, L - used)
            cur.append((i, start, start + take))
            used += take
            if used == L:  # full: the rest of this sample is dropped, the next chunk opens with the next sample
                chunks.append(cur)
                cur, used = [], 0
        self._spans = {e: c for e, c in self._spans.items() if e == epoch - 1}
        self._spans[epoch] = chunks
        return chunks

    def _pack(self, epoch: int) -> None:
        if self.packing == "aligned":
            spans = self._aligned_spans(epoch)
            ids = np.stack([np.concatenate([self.samples[i][0][a:b] for i, a, b in c]) for c in spans])
            labels = np.stack([np.concatenate([self.samples[i][1][a:b] for i, a, b in c]) for c in spans])
            self._ids, self._labels = ids, labels
        else:
            order = self._order(epoch)
            ids = np.concatenate([self.samples[i][0] for i in order])
            labels = np.concatenate([self.samples[i][1] for i in order])
            n = self.chunks_per_epoch * self.seq_len
            self._ids = ids[:n].reshape(-1, self.seq_len)
            self._labels = labels[:n].reshape(-1, self.seq_len)
        self._epoch = epoch

    def _epoch_of(self, index: int) -> tuple[int, int]:
        if self.packing != "aligned":
            return divmod(index, self.chunks_per_epoch)
        while self._starts[-1] <= index:  # extend the table of epoch starts (pure function of the seed)
            e = len(self._starts) - 1
            n = len(self._aligned_spans(e))
            self._starts.append(self._starts[-1] + n)
        e = int(np.searchsorted(self._starts, index, side="right")) - 1
        return e, index - self._starts[e]

    def chunk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``index``-th chunk of the endless stream: ``(input_ids, labels)``, each ``[seq_len]``."""
        epoch, local = self._epoch_of(index)
        if epoch != self._epoch:
            self._pack(epoch)
        return self._ids[local], self._labels[local]


class ChunkStream:
    """Global chunk index -> (source, chunk): a seeded draw of the source per index, by weight."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], total_chunks: int, seed: int):
        if len(sources) != len(weights) or not sources:
            raise ValueError("ChunkStream needs one weight per source")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mix weights {list(weights)} must be >= 0 with a positive sum")
        self.sources = list(sources)
        self.total_chunks = int(total_chunks)
        if len(sources) == 1:
            self.source_of = np.zeros(self.total_chunks, dtype=np.int64)
        else:
            rng = np.random.default_rng([seed, 0x6D6978])
            self.source_of = rng.choice(len(sources), size=self.total_chunks, p=w / w.sum())
        # index of each global chunk within its own source's stream
        self.local = np.zeros(self.total_chunks, dtype=np.int64)
        for s in range(len(sources)):
            sel = self.source_of == s
            self.local[sel] = np.arange(int(sel.sum()))

    def __len__(self) -> int:
        return self.total_chunks

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sources[self.source_of[index]].chunk(int(self.local[index]))

    def epochs(self, upto: int) -> float:
        """Epochs of the first source consumed by the first ``upto`` global chunks."""
        first = int((self.source_of[:upto] == 0).sum())
        return first / self.sources[0].chunks_per_epoch


def pack_in_order(samples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Samples in the given order, concatenated and cut into ``seq_len`` pieces; the last piece may be shorter
    (kept when it has a target). For validation, where every sample should count."""
    if not samples:
        return []
    ids = np.concatenate([s[0] for s in samples])
    labels = np.concatenate([s[1] for s in samples])
    out = []
    for start in range(0, len(ids), seq_len):
        piece = ids[start:start + seq_len], labels[start:start + seq_len]
        if len(piece[0]) >= 2 and (piece[1][1:] != IGNORE_INDEX).any():
            out.append(piece)
    return out


_SUFFIX = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}


def parse_count(text) -> int:
    """``"20M"`` -> 20_000_000; accepts K, M, G/B, T suffixes (case-insensitive), decimals and underscores."""
    s = str(text).strip().replace("_", "").replace(",", "")
    mult = 1
    if s and s[-1].upper() in _SUFFIX:
        mult, s = _SUFFIX[s[-1].upper()], s[:-1]
    try:
        value = float(s) * mult
    except ValueError:
        raise ValueError(f"{text!r}: expected a count like 20000000, 500K, 20M or 1.5G") from None
    if value < 0 or value != value:
        raise ValueError(f"{text!r}: must be >= 0")
    return int(round(value))
