"""The training input pipeline (grain): units -> conversations -> tokens -> sequences -> packed rows -> batches.

Deterministic for a seed, sharded per process (each process reads a disjoint slice of the units),
and resumable: the iterator's `get_state()` / `set_state()` capture its exact position. Malformed
units are rejected by a validation pass before training starts (`Pipeline.report`); a turn too long
for the sequence length is skipped at tokenization time and counted there too. Nothing is silently
truncated.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from her_jax.data.format import FormatError
from her_jax.data.packing import MODES, LayerWeights, pack_dataset, sequences
from her_jax.data.render import Renderer
from her_jax.data.sources import Report, Unit, unit_conversations, valid_units


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the pipeline reads and how it shapes batches.

    sources: files, folders or prepared datasets ("sample" = the bundled corpus); tokenizer: an HF
    folder (default: the offline Qwen3 tokenizer); mode: "dual_view" or "single_turn"; seq_len:
    tokens per row; batch_size: rows per step over all processes; num_epochs: None repeats forever.
    """

    sources: tuple[str, ...] = ("sample",)
    tokenizer: str | None = None
    mode: str = "dual_view"
    seq_len: int = 2048
    batch_size: int = 8
    num_packing_bins: int = 64
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1
    layer_weights: LayerWeights = LayerWeights()

    def __post_init__(self):
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        if self.mode not in MODES:
            raise ValueError(f"data.mode: expected one of {MODES}, found {self.mode!r}")
        for name in ("seq_len", "batch_size", "num_packing_bins"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"data.{name}: expected a positive int, found {getattr(self, name)!r}")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs < 1):
            raise ValueError(f"data.num_epochs: expected a positive int or None, found {self.num_epochs!r}")


class _ToSequences:
    """unit -> its training sequences (parse, render, split); rejects are counted, not raised."""

    def __init__(self, tokenizer_path: str | None, config: DataConfig, report: Report):
        from her_jax.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.renderer = Renderer(self.tokenizer)
        self.config, self.report = config, report
        self.pad_id = self.tokenizer.pad_token_id or 0

    def __call__(self, unit: Unit) -> list[dict[str, np.ndarray]]:
        out = []
        for conv in self._conversations(unit):
            try:
                out += sequences(self.renderer.render(conv), self.config.mode, self.config.layer_weights,
                                 self.pad_id, max_len=self.config.seq_len)
            except FormatError as e:  # too long for seq_len
                self.report.reject(e)
        return out

    def _conversations(self, unit: Unit):
        try:
            return unit_conversations(unit)
        except FormatError:  # already counted by the validation pass
            return []


class Pipeline:
    """Batches of packed rows for one process: dict of [local_batch, seq_len] arrays
    (tokens, targets, loss_weights, layer_ids, view_ids, positions, doc_ids)."""

    def __init__(self, config: DataConfig, process_index: int | None = None, process_count: int | None = None,
                 *, split: str = "all", eval_fraction: float = 0.0):
        """split: "all", or "train" / "eval" — a fixed share `eval_fraction` of the units, chosen by
        a hash of their ids (stable across runs, machines and source order)."""
        import grain

        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if config.batch_size % process_count:
            raise ValueError(f"data.batch_size={config.batch_size} is not divisible by {process_count} processes")
        self.config = config
        self.local_batch = config.batch_size // process_count
        self.report = Report()
        units = [unit for unit, _ in valid_units(list(config.sources), self.report)]
        if split != "all":
            if split not in ("train", "eval"):
                raise ValueError(f"split: expected 'all', 'train' or 'eval', found {split!r}")
            units = [u for u in units if in_eval_split(u.id, eval_fraction) == (split == "eval")]
        if not units:
            raise ValueError(f"no usable data in {list(config.sources)} (split {split!r}): {self.report.to_json()}")
        self.num_units = len(units)
        to_sequences = _ToSequences(config.tokenizer, config, self.report)
        self.tokenizer = to_sequences.tokenizer

        ds = grain.MapDataset.source(units)
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed)
        ds = ds.repeat(config.num_epochs)
        ds = ds[process_index::process_count]
        seqs = ds.map(to_sequences).to_iter_dataset()
        seqs = _flatten(seqs)
        rows = pack_dataset(seqs, config.seq_len, num_bins=config.num_packing_bins, pad_id=to_sequences.pad_id,
                            seed=config.seed)
        self.dataset = rows.batch(self.local_batch, drop_remainder=True)

    def __iter__(self):
        """A grain DatasetIterator: `get_state()` / `set_state(state)` checkpoint and restore it."""
        return iter(self.dataset)


def in_eval_split(unit_id: str, fraction: float) -> bool:
    """Whether a unit belongs to the held-out split (a stable hash of its id)."""
    return zlib.crc32(unit_id.encode("utf-8")) % 10_000 < fraction * 10_000


def _flatten(ds):
    from grain.experimental import FlatMapIterDataset, FlatMapTransform

    class Flatten(FlatMapTransform):
        max_fan_out = 1 << 16

        def flat_map(self, element):
            return element

    return FlatMapIterDataset(ds, Flatten())

