"""The importance store: what supervised training needs of a trace set, and nothing more.

Training a scorer to predict future attention needs, per (trace, prefix length n), the target I_n of
every cached entry of every head, plus (for scorers that read them) the attention statistics the
inference cache has at compression time. Queries are not needed once these are computed, so the
store keeps, per trace, only (fp16 safetensors, one file per trace, written atomically):

    imp.<n>      [L, Hkv, n]  I_n(i) = sum_{j >= n} max_g A_g[j, i]           (the env's target, agg=max)
    imp_mean.<n> [L, Hkv, n]  the same with the mean over the group            (agg=mean)
    h2o.<n>      [L, Hkv, n]  mean_g sum_{j < n} A_g[j, i] / (n - i)           (normalised H2O)
    window.<n>   [L, Hkv, n]  mean_g sum_{n - w <= j < n} A_g[j, i]            (the recent window's vote)
    last.<n>     [L, Hkv, n]  mean_g A_g[n - 1, i]                              (the last query's, TOVA's)

``marks`` adds, on every trace that has them (RULER, dialogue), the prefix n at its question's first token
("question": a context compressed before a new question, the target is what the question and its answer
attend to) or at its answer's ("answer": the question compressed with the context, the target is what the
answer attends to).

Keys and values are read from the trace itself (memory-mapped). At three prefixes of a 1024-token
trace this is 30 x 3 x 1536 x 5 x 2 B = 1.4 MB per trace (2.1 MB with a question prefix: measured on
SmolLM2's RULER and dialogue traces), against 59 MB for the trace's Q/K/V: a
corpus's targets fit in memory, and the trace files could even drop their queries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvp_gym.io import remove_temp_files, write_atomic
from kvp_gym.progress import progress_bar
from kvp_gym.traces import Trace, TraceDataset
from kvp_gym.utility.importance import _attention_chunks, _group_aggregate

STATISTICS = ("imp", "imp_mean", "h2o", "window", "last")
MARKS = ("question", "answer")  # a trace's meta "<mark>_token" is a prefix of its own


def trace_statistics(trace: Trace, prefixes: Sequence[int], window: int = 64, chunk: int = 512) -> dict[str, torch.Tensor]:
    """Every statistic of the module docstring for one trace: {"<name>.<n>": [L, Hkv, n] float32}.

    Needs window <= n < trace.length for every n (a prefix with a future and a full window). Queries go
    ``chunk`` at a time, each over the keys it can see, so the causal half of the attention matrix is never
    computed (1.8x faster than the whole [T, T] matrix per layer at 4k tokens, the same sums to float
    round-off) and memory stays O(H * chunk * T). Only a chunk's diagonal block is masked, and a chunk's column
    sums are taken once for every prefix it lies wholly after (or before): 20.7 instead of 23.5 s for a 4k trace
    at the long recipe's seven prefixes, one thread, bit for bit the same statistics (round 16).
    """
    spec = trace.spec
    for n in prefixes:
        if not window <= n < trace.length:
            raise ValueError(f"prefix {n} must lie in [window={window}, trace length {trace.length})")
    out = {f"{name}.{n}": torch.zeros(spec.num_layers, spec.num_kv_heads, n) for n in prefixes for name in STATISTICS}
    top = max(prefixes)
    for layer in range(spec.num_layers):
        for start, stop, probs in _attention_chunks(trace, layer, chunk, pad=False):
            seen = min(stop, top)  # keys beyond the query (or beyond every prefix) add nothing
            probs = probs[:, :, :seen]
            group_max = _group_aggregate(probs, spec.num_kv_heads, "max")  # [Hkv, chunk, seen]
            group_mean = _group_aggregate(probs, spec.num_kv_heads, "mean")
            max_total, mean_total = group_max.sum(1), group_mean.sum(1)  # the whole chunk's, shared by many prefixes
            for n in prefixes:
                cols = min(n, seen)
                future, past, recent = max(start, n) - start, min(stop, n) - start, max(start, n - window) - start
                if future == 0:  # queries j >= n: all the chunk's, or some
                    out[f"imp.{n}"][layer, :, :cols] += max_total[:, :cols]
                    out[f"imp_mean.{n}"][layer, :, :cols] += mean_total[:, :cols]
                elif future < stop - start:
                    out[f"imp.{n}"][layer, :, :cols] += group_max[:, future:, :cols].sum(1)
                    out[f"imp_mean.{n}"][layer, :, :cols] += group_mean[:, future:, :cols].sum(1)
                if past == stop - start:  # queries j < n: all the chunk's, or some
                    out[f"h2o.{n}"][layer, :, :cols] += mean_total[:, :cols]
                elif past > 0:
                    out[f"h2o.{n}"][layer, :, :cols] += group_mean[:, :past, :cols].sum(1)
                if recent < past:  # queries n - window <= j < n
                    out[f"window.{n}"][layer, :, :cols] += group_mean[:, recent:past, :cols].sum(1)
                if start < n <= stop:  # query n - 1
                    out[f"last.{n}"][layer, :, :cols] = group_mean[:, n - 1 - start, :cols]
        for n in prefixes:
            out[f"h2o.{n}"][layer] /= (n - torch.arange(n)).float()
    return out


class ImportanceStore:
    """The store of one trace set: ``store.load(position) -> {"<name>.<n>": tensor}`` (fp16, loaded on demand).

    Built by ``ImportanceStore.build(traces, prefixes)`` into ``<traces_dir>/importance-<key>``, resumably
    (one file per trace). ``store.prefixes_of(position)`` lists the prefixes n a trace has statistics at: those
    of ``prefixes`` that leave it a future (n < its length), and with ``marks`` its question's or answer's first
    token; a trace with none (shorter than every prefix) is skipped.
    """

    def __init__(self, directory: Path, prefixes: tuple[int, ...], trace_prefixes: dict[int, tuple[int, ...]]) -> None:
        """``trace_prefixes``: {trace index: the prefixes it has statistics at}, in store order."""
        self.directory, self.prefixes, self.trace_prefixes = directory, prefixes, trace_prefixes
        self.indices = list(trace_prefixes)

    @staticmethod
    def directory_for(traces_dir: str | Path, prefixes: Sequence[int], window: int, marks: Sequence[str] = ()) -> Path:
        settings = {"prefixes": list(prefixes), "window": window, "statistics": list(STATISTICS), "marks": sorted(marks)}
        key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:10]
        return Path(traces_dir) / f"importance-{key}"

    @classmethod
    def build(cls, traces: TraceDataset, prefixes: Sequence[int], window: int = 64, show_progress: bool = True,
              marks: Sequence[str] = (), workers: int = 0) -> ImportanceStore:
        """The store, its missing files written first (one trace at a time, or on ``workers`` Ray workers:
        the same bytes)."""
        from kvp_gym.scale import wants_ray

        prefixes = tuple(sorted(int(n) for n in prefixes))
        if prefixes[0] < window:
            raise ValueError(f"prefix {prefixes[0]} is shorter than the query window {window}")
        unknown = set(marks) - set(MARKS)
        if unknown:
            raise ValueError(f"marks must be among {MARKS}, got {sorted(unknown)}")
        distributed = wants_ray(workers, None)
        directory = cls.directory_for(traces.directory, prefixes, window, marks)
        directory.mkdir(exist_ok=True)
        remove_temp_files(directory)
        trace_prefixes = {}
        for i, length in enumerate(traces.lengths):
            marked = {traces[i].meta.get(f"{mark}_token") for mark in marks} - {None, *prefixes}
            fitting = tuple(n for n in (*prefixes, *sorted(marked)) if window <= n < length)
            if fitting:
                trace_prefixes[i] = fitting
        if not trace_prefixes:
            raise ValueError(f"no trace of {traces.directory} is longer than a prefix of {prefixes} (window {window})")
        indices = list(trace_prefixes)
        missing = [(i, trace_prefixes[i]) for i in indices if not statistics_path(directory, i).exists()]
        with progress_bar(len(indices), f"importance store {traces.directory.name}", enabled=show_progress) as bar:
            bar.advance(len(indices) - len(missing))
            if distributed:
                from kvp_gym.scale.store import statistics_on_workers

                statistics_on_workers(traces.directory, directory, window, missing, lambda _: bar.advance(1), workers)
            else:
                for i, trace_prefix in missing:
                    write_statistics(directory, traces[i], trace_prefix, window)
                    bar.advance(1)
        return cls(directory, prefixes, trace_prefixes)

    def prefixes_of(self, position: int) -> tuple[int, ...]:
        """The prefixes n the ``position``-th trace has statistics at."""
        return self.trace_prefixes[self.indices[position]]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, position: int) -> dict[str, torch.Tensor]:
        """The statistics of the store's ``position``-th trace (trace index ``self.indices[position]``)."""
        return load_file(str(statistics_path(self.directory, self.indices[position])))


def statistics_path(directory: Path, index: int) -> Path:
    """The store file of trace ``index`` in the store ``directory``."""
    return directory / f"seq_{index:05d}.safetensors"


def write_statistics(directory: Path, trace: Trace, prefixes: Sequence[int], window: int) -> None:
    """``trace_statistics`` of one trace, as fp16, written atomically to its store file in ``directory``."""
    stats = {name: value.half().contiguous() for name, value in trace_statistics(trace, prefixes, window).items()}
    write_atomic(statistics_path(directory, trace.index), lambda tmp: save_file(stats, str(tmp)))
