"""Prepared datasets: validated units stored with tensorflow-datasets as array_record (no TensorFlow).

`prepare(paths, out_dir)` reads any supported source, keeps the units that parse, and writes them
(one example per unit: id, kind, JSON data) through a TFDS builder in the array_record format,
plus `her_jax_prepared.json` with the rejection report. Training reads the result back with random
access (`prepared_units`), which grain uses directly as a data source.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

from her_jax.data.sources import Report, Unit, valid_units

MARKER = "her_jax_prepared.json"


@functools.cache
def _builder_class():
    """Defined on first use (TFDS registers builder classes by name, once per process)."""
    import tensorflow_datasets as tfds

    class HerScenes(tfds.core.GeneratorBasedBuilder):
        """Role-play units (scenes, message lists, book conversations) validated by her_jax."""

        VERSION = tfds.core.Version("1.0.0")
        disable_shuffling = True  # keep the order of the sources
        RELEASE_NOTES = {"1.0.0": "Units as JSON text: id, kind, data."}

        def __init__(self, *, units=(), **kwargs):
            self._units = units
            super().__init__(file_format="array_record", **kwargs)

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                         features=tfds.features.FeaturesDict({"id": text, "kind": text, "data": text}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, unit in enumerate(self._units):
                yield i, {"id": unit.id, "kind": unit.kind, "data": json.dumps(unit.data, ensure_ascii=False)}

    return HerScenes


def prepare(paths, out_dir: str) -> Report:
    """Validate `paths` and write the accepted units to `out_dir` (TFDS, array_record)."""
    report = Report()
    units = [unit for unit, _ in valid_units(paths, report)]
    builder = _builder_class()(units=units, data_dir=os.path.abspath(out_dir))
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout stays ours
        builder.download_and_prepare()
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        json.dump({"builder_dir": os.path.relpath(builder.data_dir, out_dir), "report": report.to_json()}, f, indent=2)
    return report


class PreparedUnits:
    """Random-access view of a prepared dataset's units (what grain's MapDataset.source wants)."""

    def __init__(self, folder: str):
        marker = os.path.join(folder, MARKER)
        if not os.path.exists(marker):
            raise FileNotFoundError(f"{folder}: not a prepared her_jax dataset (no {MARKER}); "
                                    "run `python -m her_jax.data prepare` first")
        with open(marker, encoding="utf-8") as f:
            self.info = json.load(f)
        builder = _builder_class()(data_dir=os.path.abspath(folder))
        self._source = builder.as_data_source("train")

    def __len__(self) -> int:
        return len(self._source)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> Unit:
        ex = self._source[i]
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else v
        return Unit(text(ex["id"]), text(ex["kind"]), json.loads(text(ex["data"])))


def prepared_units(folder: str) -> PreparedUnits:
    return PreparedUnits(folder)
