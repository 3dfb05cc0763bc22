"""JSONL → megatron-core indexed shards, parallel and crash-safe.

Design (why it looks like this):

- The main process only reads raw lines and writes shards; workers do everything costly
  (UTF-8 decoding, JSON parsing, sentence splitting, tokenization, numpy packing). Work moves in
  chunks of ~1 MiB of raw lines so that each worker makes one *batch* tokenizer call per chunk;
  Megatron-LM's one-document-per-task pool spends much of its time in IPC and per-call overhead.
- Results come back in submission order with a bounded number of chunks in flight, so output is
  byte-identical for any ``--workers`` and memory stays flat however large the corpus is.
- A bad line is reported by the worker as data; the main process raises it in input order, so
  the error is always the *first* bad line, whatever the worker count.
- Shards are written through :class:`~megatron_cpt.data.indexed.IndexedWriter` under temporary
  names; an error, Ctrl-C or SIGTERM removes them.
- Each worker tokenizes on one thread (HF ``tokenizers`` would otherwise start a thread pool per
  process and oversubscribe the cores); parallelism is exactly ``--workers`` processes. Where it
  is safe, that one thread is a one-thread rayon pool, ``tokenizers``' faster batch path
  (:func:`_one_tokenizer_thread`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from megatron_cpt.data.indexed import IndexedWriter, token_dtype
from megatron_cpt.data.jsonl import (
    EMPTY_DOCUMENT,
    UNDECODABLE,
    JsonlRecord,
    expand_inputs,
    get_text,
    parse_line,
    read_blocks,
    read_texts,
)
from megatron_cpt.data.sentences import SentenceSplitter, SentenceSplitterConfig
from megatron_cpt.errors import BadInputError, UserError
from megatron_cpt.lifetime import die_with_parent, parent_alive
from megatron_cpt.tokenizers import Tokenizer, build_tokenizer


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str
    json_keys: tuple[str, ...] = ("text",)
    workers: int = 1
    append_eod: bool = False
    split_sentences: bool = False
    sentences: SentenceSplitterConfig = field(default_factory=SentenceSplitterConfig)
    skip_bad_lines: bool = False
    log_interval: int = 1000  # documents between progress lines; 0 = silent
    chunk_bytes: int = 1 << 20  # raw input bytes per worker task, at most (see task_bytes)


def output_prefixes(config: PreprocessConfig) -> dict[str, str]:
    """Megatron-LM's naming: ``{prefix}_{key}_{document|sentence}``."""
    level = "sentence" if config.split_sentences else "document"
    return {key: f"{config.output_prefix}_{key}_{level}" for key in config.json_keys}


@dataclass
class Chunk:
    """Whole raw lines of one file: splitting them is left to the worker, off the main process."""

    path: str
    first_line: int  # 1-based number of the first line in ``data``
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """``(line number, raw line)`` for non-blank lines, as ``jsonl.iter_raw_lines`` does."""
        for number, raw in enumerate(self.data.split(b"\n"), start=self.first_line):
            if raw and not raw.isspace():  # no stripped copy of every line
                yield number, raw

    @property
    def may_hold_surrogate_escapes(self) -> bool:
        """One scan of the chunk instead of two per line (see :func:`_has_lone_surrogate`)."""
        return b"\\ud" in self.data or b"\\uD" in self.data


@dataclass
class EncodedKey:
    tokens: np.ndarray  # flat, already in the shard dtype
    sequence_lengths: np.ndarray  # int32, one per sequence (document or sentence)
    sequences_per_document: np.ndarray  # int64


@dataclass
class ChunkResult:
    keys: list[EncodedKey]
    skipped: Counter
    nbytes: int
    # (path, line, problem, reason) of the first bad line when not skipping; a tuple because
    # exceptions with custom __init__ signatures do not survive pickling between processes.
    error: tuple[str, int, str, str] | None = None


def _has_lone_surrogate(raw: bytes, text: str) -> bool:
    """JSON ``\\udXXX`` escapes can produce unpaired surrogates, which no tokenizer can encode."""
    if b"\\ud" not in raw and b"\\uD" not in raw:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _is_empty(text: str) -> bool:
    return not text or text.isspace()


class ChunkEncoder:
    """Turns one chunk of raw JSONL lines into packed token arrays, one per JSON key."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        json_keys: tuple[str, ...],
        dtype: np.dtype,
        *,
        append_eod: bool,
        skip_bad_lines: bool,
        splitter: SentenceSplitter | None = None,
    ):
        self.tokenizer = tokenizer
        self.json_keys = tuple(json_keys)
        self.dtype = np.dtype(dtype)
        self.append_eod = append_eod
        self.skip_bad_lines = skip_bad_lines
        self.splitter = splitter

    def __call__(self, chunk: Chunk) -> ChunkResult:
        skipped: Counter = Counter()
        texts: list[list[str]] = [[] for _ in self.json_keys]
        check_surrogates = chunk.may_hold_surrogate_escapes
        for number, raw in chunk.lines():
            try:
                obj = parse_line(chunk.path, number, raw)
                record = JsonlRecord(chunk.path, number, obj, len(raw))
                values = [get_text(record, key) for key in self.json_keys]
                for key, value in zip(self.json_keys, values):
                    if check_surrogates and _has_lone_surrogate(raw, value):
                        raise BadInputError(
                            chunk.path,
                            number,
                            f"key {key!r} contains an unpaired surrogate escape (not valid Unicode)",
                            UNDECODABLE,
                        )
            except BadInputError as err:
                if not self.skip_bad_lines:
                    return ChunkResult(
                        [], skipped, chunk.nbytes, (err.path, err.line, err.problem, err.reason)
                    )
                skipped[err.reason] += 1
                continue
            for bucket, value in zip(texts, values):
                bucket.append(value)
        encoded = [self._encode_key(docs, skipped) for docs in texts]
        return ChunkResult(encoded, skipped, chunk.nbytes)

    def _encode_key(self, docs: list[str], skipped: Counter) -> EncodedKey:
        kept = [d for d in docs if not _is_empty(d)]
        if self.splitter is not None:
            pieces = [self.splitter.split(d) for d in kept]
            sequences = list(chain.from_iterable(pieces))
            per_doc = np.fromiter(map(len, pieces), np.int64, count=len(pieces))
        else:
            sequences = kept
            per_doc = np.ones(len(kept), np.int64)
        if sequences:
            flat, lengths = self.tokenizer.encode_batch_flat(sequences, self.dtype)
        else:
            flat, lengths = np.zeros(0, self.dtype), np.zeros(0, np.int64)
        nonzero = lengths > 0
        if not nonzero.all():
            # Megatron-LM drops sentences that tokenize to nothing; a document left with no
            # tokens is empty and dropped as well.
            doc_of_seq = np.repeat(np.arange(len(per_doc)), per_doc)
            per_doc = np.bincount(doc_of_seq[nonzero], minlength=len(per_doc)).astype(np.int64)
            lengths = lengths[nonzero]
        empty = int(len(docs) - np.count_nonzero(per_doc))
        if empty:
            skipped[EMPTY_DOCUMENT] += empty
            per_doc = per_doc[per_doc > 0]
        if self.append_eod and len(per_doc):
            last_seq = np.cumsum(per_doc) - 1
            ends = np.cumsum(lengths)[last_seq]
            flat = np.insert(flat, ends, np.asarray(self.tokenizer.eod, self.dtype))
            lengths[last_seq] += 1
        return EncodedKey(flat, lengths.astype(np.int32), per_doc)


#: the smallest task :func:`task_bytes` picks on its own: ~20 documents of a few KB, still
#: one batch tokenizer call of ~50 ms, so the per-task IPC stays under 1 %
MIN_TASK_BYTES = 64 << 10


def task_bytes(config: PreprocessConfig, paths: list[Path]) -> int:
    """Raw bytes per worker task: ``--chunk-bytes``, or less for a small input, so that each
    worker gets at least 8 tasks. With 1 MiB tasks a 4 MB corpus is 4 tasks on 2 workers, and the
    run ends on one busy worker while the other idles. Output does not depend on this: documents
    are encoded independently and written in input order."""
    if config.workers <= 1:
        return config.chunk_bytes
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):
            total += os.path.getsize(path)  # compressed inputs: smaller still, which is fine
    return min(config.chunk_bytes, max(MIN_TASK_BYTES, total // (8 * config.workers)))


def iter_chunks(paths: Iterable[Path], chunk_bytes: int) -> Iterator[Chunk]:
    """Read each file in blocks of about ``chunk_bytes``, cut at line ends; never across files."""
    for path in paths:
        number = 1
        pending: list[bytes] = []  # a line longer than a block spans several reads
        for block in read_blocks(path, chunk_bytes):
            cut = block.rfind(b"\n")
            if cut < 0:
                pending.append(block)
                continue
            data = b"".join([*pending, block[: cut + 1]]) if pending else block[: cut + 1]
            pending = [block[cut + 1 :]] if cut + 1 < len(block) else []
            yield Chunk(str(path), number, data)
            number += data.count(b"\n")
        tail = b"".join(pending)
        if tail.strip():
            yield Chunk(str(path), number, tail)


ENV_PARALLELISM = "TOKENIZERS_PARALLELISM"


def _c_getenv(name: str) -> str | None:
    """The C environment's value (``os.environ`` is Python's copy, blind to native setenv)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_char_p
        value = libc.getenv(name.encode())
    except (OSError, AttributeError):
        return "unknown"
    return None if value is None else value.decode(errors="replace")


def _one_tokenizer_thread(rayon_allowed: bool) -> None:
    """One tokenizer thread per worker, on the faster of HF ``tokenizers``' two paths.

    ``encode_batch_fast`` runs 1.11-1.28x more tokens per CPU-second through its rayon path
    with one thread (``TOKENIZERS_PARALLELISM=true``, ``RAYON_NUM_THREADS=1``) than through its
    serial path (``TOKENIZERS_PARALLELISM=false``): bench/tokenizer_paths.py. Rayon is only safe in a child
    whose parent never started rayon threads (they do not survive ``fork``, and a pool without
    threads waits forever). ``rayon_allowed`` says the parent forked with the variable unset;
    then ``tokenizers``' own fork hook marks a child whose parent had used parallelism (an
    internal override in recent versions, the C environment variable in older ones, which is
    why the C value is read), and either way that child stays serial.
    """
    if rayon_allowed and _c_getenv(ENV_PARALLELISM) is None:
        os.environ[ENV_PARALLELISM] = "true"
        os.environ["RAYON_NUM_THREADS"] = "1"
    else:
        os.environ[ENV_PARALLELISM] = "false"


def _worker_main(
    encoder: ChunkEncoder, tasks, results, parent_pid: int, rayon_allowed: bool
) -> None:
    """A worker: encode chunks from its own task queue, send results down its own pipe.

    A parent killed with SIGKILL cannot stop its workers, and a worker blocked writing a result
    nobody reads would wait forever: the kernel kills it when the parent dies (Linux), and
    elsewhere the worker checks for its parent whenever its queue stays empty for a second.
    """
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _one_tokenizer_thread(rayon_allowed)
    while True:
        try:
            chunk = tasks.get(timeout=1.0)
        except queue.Empty:
            if not parent_alive(parent_pid):
                os._exit(1)
            continue
        if chunk is None:
            break
        results.send(encoder(chunk))
    results.close()


def _death_message(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
    else:
        how = f"exit code {exitcode}"
    return f"a tokenizer worker died ({how}); nothing was written"


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def map_ordered(
    encoder: ChunkEncoder, chunks: Iterable[Chunk], workers: int, in_flight: int | None = None
) -> Iterator[ChunkResult]:
    """``map(encoder, chunks)`` over ``workers`` processes, in order, with bounded look-ahead.

    Not ``multiprocessing.Pool``: its ``terminate()`` signals workers with SIGTERM and then waits
    for them while holding the shared task-queue lock, and in testing a worker that had not yet
    handled the signal waited for that lock forever. Here chunk ``i`` goes to worker
    ``i % workers`` through that worker's own queue and comes back through its own pipe (order is
    then free), nothing is shared, and stopping early is SIGKILL, which cannot be missed.
    """
    if workers <= 1:
        # In this process rayon's pool may already exist with any number of threads: serial.
        with _env(ENV_PARALLELISM, "false"):
            for chunk in chunks:
                yield encoder(chunk)
        return
    in_flight = max(in_flight or 3 * workers, workers)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs, task_queues, result_pipes = [], [], []
    finished = False
    try:
        # Unset while forking, so that the children may use rayon (see _one_tokenizer_thread);
        # a value the user set (or an outer caller) is respected: "false" in every child.
        rayon_allowed = ENV_PARALLELISM not in os.environ
        with contextlib.nullcontext() if rayon_allowed else _env(ENV_PARALLELISM, "false"):
            for _ in range(workers):
                tasks = ctx.Queue()
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker_main,
                    args=(encoder, tasks, send, os.getpid(), rayon_allowed),
                    daemon=True,
                )
                proc.start()
                send.close()  # the worker holds the only write end: its death reads as EOF here
                procs.append(proc)
                task_queues.append(tasks)
                result_pipes.append(receive)
        submitted = received = 0
        chunk_iter = iter(chunks)
        exhausted = False
        while True:
            while not exhausted and submitted - received < in_flight:
                chunk = next(chunk_iter, None)
                if chunk is None:
                    exhausted = True
                    break
                task_queues[submitted % workers].put(chunk)
                submitted += 1
            if received == submitted:
                break
            try:
                result = result_pipes[received % workers].recv()
            except EOFError:
                dead = procs[received % workers]
                dead.join(timeout=5)
                raise UserError(_death_message(dead.exitcode)) from None
            received += 1
            yield result
        for tasks in task_queues:
            tasks.put(None)
        for proc in procs:
            proc.join()
        finished = True
    finally:
        if not finished:
            for proc in procs:
                proc.kill()
            for proc in procs:
                proc.join()
        for tasks in task_queues:
            if not finished:
                tasks.cancel_join_thread()  # its worker is gone: do not flush into a dead pipe
            tasks.close()
        for pipe in result_pipes:
            pipe.close()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the same cleanup as Ctrl-C runs."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if not hasattr(signal, "SIGTERM") or signal.getsignal(signal.SIGTERM) is None:
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)

        owner = os.getpid()

        def handler(signum, frame):
            if os.getpid() != owner:  # a forked worker: die the default way
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            raise _Terminated()

        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Progress:
    """Throughput lines on stderr every ``interval`` documents."""

    def __init__(self, interval: int, stream=None):
        self.interval = interval
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.next_at = interval

    def update(self, documents: int, tokens: int, nbytes: int) -> None:
        if self.interval <= 0 or documents < self.next_at:
            return
        self.next_at = (documents // self.interval + 1) * self.interval
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        print(
            f"processed {documents} documents | {documents / elapsed:.1f} docs/s | "
            f"{tokens / elapsed:.0f} tokens/s | {nbytes / elapsed / 1e6:.2f} MB/s",
            file=self.stream,
            flush=True,
        )


def _train_splitter(config: PreprocessConfig, paths: list[Path]) -> SentenceSplitter:
    sample = (
        text
        for _, text in read_texts([str(p) for p in paths], config.json_keys[0], skip_bad_lines=True)
    )
    return SentenceSplitter.train(sample, config.sentences)


def _describe_skipped(skipped: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))


def run_preprocess(
    config: PreprocessConfig,
    tokenizer: Tokenizer | None = None,
    progress_stream=None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict:
    """Tokenize ``config.inputs`` into one shard per JSON key; returns the summary dict."""
    if config.workers < 1:
        raise UserError(f"--workers {config.workers}: must be at least 1")
    if config.chunk_bytes < 1:
        raise UserError(f"--chunk-bytes {config.chunk_bytes}: must be at least 1")
    if not config.json_keys:
        raise UserError("--json-keys: give at least one key")
    if len(set(config.json_keys)) != len(config.json_keys):
        raise UserError(f"--json-keys {' '.join(config.json_keys)}: keys repeat")
    start = time.perf_counter()
    paths = expand_inputs(config.inputs)
    if tokenizer is None:
        tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    dtype = token_dtype(tokenizer.vocab_size)
    splitter = _train_splitter(config, paths) if config.split_sentences else None
    encoder = ChunkEncoder(
        tokenizer,
        tuple(config.json_keys),
        dtype,
        append_eod=config.append_eod,
        skip_bad_lines=config.skip_bad_lines,
        splitter=splitter,
    )
    prefixes = output_prefixes(config)
    skipped: Counter = Counter()
    nbytes = documents = tokens = 0
    progress = Progress(config.log_interval, progress_stream)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_as_interrupt())
        try:
            writers = [
                stack.enter_context(IndexedWriter(prefixes[k], dtype)) for k in config.json_keys
            ]
        except OSError as exc:
            raise UserError(
                f"--output-prefix {config.output_prefix}: cannot write ({exc})"
            ) from None
        results = stack.enter_context(
            contextlib.closing(
                map_ordered(encoder, iter_chunks(paths, task_bytes(config, paths)), config.workers)
            )
        )
        for result in results:
            if result.error is not None:
                raise BadInputError(*result.error)
            skipped.update(result.skipped)
            nbytes += result.nbytes
            for writer, enc in zip(writers, result.keys):
                writer.add_documents(enc.tokens, enc.sequence_lengths, enc.sequences_per_document)
            documents = writers[0].documents
            tokens = sum(w.tokens for w in writers)
            progress.update(documents, tokens, nbytes)
            if on_chunk is not None:
                on_chunk(documents)
        if writers[0].documents == 0:
            # A 0-document pair looks valid but breaks training much later; refuse it here.
            detail = f" ({_describe_skipped(skipped)} skipped)" if skipped else ""
            raise UserError(
                f"{', '.join(str(p) for p in paths)}: no non-empty documents{detail}; "
                "nothing was written"
            )
        for writer in writers:
            writer.finalize()
    seconds = time.perf_counter() - start
    outputs = {
        key: {
            "prefix": w.prefix,
            "bin": f"{w.prefix}.bin",
            "idx": f"{w.prefix}.idx",
            "documents": w.documents,
            "sequences": w.sequences,
            "tokens": w.tokens,
        }
        for key, w in zip(config.json_keys, writers)
    }
    total_docs = sum(o["documents"] for o in outputs.values())
    total_tokens = sum(o["tokens"] for o in outputs.values())
    return {
        "documents": total_docs,
        "tokens": total_tokens,
        "skipped": dict(sorted(skipped.items())),
        "seconds": round(seconds, 3),
        "documents_per_second": round(total_docs / seconds, 1),
        "tokens_per_second": round(total_tokens / seconds, 1),
        "input_mb_per_second": round(nbytes / seconds / 1e6, 3),
        "input_files": [str(p) for p in paths],
        "input_bytes": nbytes,
        "workers": config.workers,
        "tokenizer": {
            "type": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
        },
        "dtype": np.dtype(dtype).name,
        "outputs": outputs,
    }
