"""The formats inference results are written in: the text formats (table, csv, json, jsonl) row by row as
predictions come, and the Parquet prediction dataset (`parquet`: a folder of part files with a row for every
input, failed ones included). Where they are written is cifarkit.infer.outputs.

Names from data (paths, class names) are escaped by one reversible rule (cifarkit.escape): table and csv
carry escape_name's text, json and jsonl JSON strings, Parquet the csv text; no format can be broken by a name,
and none passes a control character to a terminal.

    writer = Writer(f, "csv", labels, top_k); writer.start(); writer.row(prediction); writer.end()
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cifarkit.escape import escape_name, json_line
from cifarkit.files import Failure
from cifarkit.shards import SHARD_SUFFIX, pyarrow_modules

if TYPE_CHECKING:
    from cifarkit.infer.classifier import Prediction

TEXT_FORMATS = ("table", "csv", "json", "jsonl")


# ---------------------------------------------------------------------------------------------------------
# Text formats
# ---------------------------------------------------------------------------------------------------------


class Writer:
    """table: aligned columns, path last (rows stream out before the longest path is known, while the label
    width is known from the model's class names); csv: path,label,index,probability then label_2,
    probability_2, ... for top-k > 1; jsonl: one object a line; json: one array of those objects."""

    def __init__(self, f: IO[str] | Any, fmt: str, labels: tuple[str, ...], top_k: int) -> None:
        if fmt not in TEXT_FORMATS:
            raise ValueError(f"unknown text format {fmt!r}")
        self.f, self.fmt, self.k = f, fmt, top_k
        self.names = {label: escape_name(label) for label in labels}  # escaped once, not per row
        self.width = max(5, *(len(name) for name in self.names.values()))
        self.csv = csv.writer(f, lineterminator="\n") if fmt == "csv" else None
        self.rows = 0

    def start(self) -> None:
        if self.fmt == "table":
            cells = [f"{'label' if i == 0 else f'#{i + 1}':<{self.width}}   prob" for i in range(self.k)]
            self.f.write("  ".join(cells) + "  path\n")
        elif self.fmt == "csv":
            extra = [c for i in range(2, self.k + 1) for c in (f"label_{i}", f"probability_{i}")]
            self.csv.writerow(["path", "label", "index", "probability", *extra])
        elif self.fmt == "json":
            self.f.write("[")

    def row(self, p: Prediction) -> None:
        names = self.names
        if self.fmt == "table":
            cells = [f"{names[label]:<{self.width}} {100 * prob:5.1f}%" for label, prob in p.top_k]
            self.f.write("  ".join(cells) + f"  {escape_name(p.source)}\n")
        elif self.fmt == "csv":
            extra = [v for label, prob in p.top_k[1:] for v in (names[label], f"{prob:.6f}")]
            self.csv.writerow([escape_name(p.source), names[p.label], p.index, f"{p.probability:.6f}", *extra])
        else:
            text = json_line(p.to_dict())
            if self.fmt == "json":
                text = ("\n" if self.rows == 0 else ",\n") + text
            self.f.write(text + ("\n" if self.fmt == "jsonl" else ""))
        self.rows += 1

    def end(self) -> None:
        if self.fmt == "json":
            self.f.write("\n]\n")


# ---------------------------------------------------------------------------------------------------------
# Parquet: a dataset folder of part files (--format parquet)
# ---------------------------------------------------------------------------------------------------------

PART_ROWS = 1_000_000  # rows per part file (~20-60 MB)
GROUP_ROWS = 65_536  # rows per row group: what the writer buffers


def prediction_schema(pa: Any) -> Any:
    """One row per input, in input order. `path` (and `label`) are the text the csv format writes (cifarkit.escape:
    non-UTF-8 bytes as \\xNN, control characters escaped; unescape_name gives the name back); `error` is null
    for a classified image, and the other columns are null for an input that failed."""
    top = pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float32())]))
    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("index", pa.int32()),
            ("probability", pa.float32()),  # the model's float32 softmax output, as computed
            ("top_k", top),
            ("error", pa.string()),
        ]
    )


class PredictionRows:
    """Results -> the columns of prediction_schema, names escaped as the csv format writes them."""

    def __init__(self, pa: Any) -> None:
        self.pa, self.schema = pa, prediction_schema(pa)
        self.columns: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        self.names: dict[str, str] = {}  # class name -> its escaped text, escaped once

    def __len__(self) -> int:
        return len(self.columns["path"])

    def add(self, r: Any) -> None:
        """A Prediction, or a Failure (then only path and error are set)."""
        c = self.columns
        c["path"].append(escape_name(r.source))
        if isinstance(r, Failure):
            for name in ("label", "index", "probability", "top_k"):
                c[name].append(None)
            c["error"].append(escape_name(r.message))
            return
        c["label"].append(self._name(r.label))
        c["index"].append(r.index)
        c["probability"].append(r.probability)
        c["top_k"].append([{"label": self._name(label), "probability": q} for label, q in r.top_k])
        c["error"].append(None)

    def _name(self, label: str) -> str:
        text = self.names.get(label)
        return text if text is not None else self.names.setdefault(label, escape_name(label))

    def table(self) -> Any:
        """The rows so far as a pyarrow Table; the buffer starts again empty."""
        table = self.pa.Table.from_pydict(self.columns, schema=self.schema)
        self.columns = {name: [] for name in self.schema.names}
        return table


def prediction_table(results: Iterable[Any]) -> Any:
    """Predictions and Failures -> one pyarrow Table in prediction_schema (what a Ray actor sends back)."""
    rows = PredictionRows(pyarrow_modules()[0])
    for r in results:
        rows.add(r)
    return rows.table()


class PredictionParts:
    """Tables in prediction_schema -> part-NNNNN.parquet files in `folder` (the temporary folder of
    atomic.staged_folder), at most `part_rows` rows each, written a row group of `group_rows` at a time: memory
    holds at most that many rows (plus one table handed in)."""

    def __init__(self, folder: Path, part_rows: int = PART_ROWS, group_rows: int = GROUP_ROWS) -> None:
        self.pa, self.pq = pyarrow_modules()
        self.schema = prediction_schema(self.pa)
        self.folder, self.part_rows, self.group_rows = folder, part_rows, group_rows
        self.pending: list[Any] = []  # tables waiting for a full row group
        self.pending_rows = 0
        self.writer: Any = None
        self.parts = 0
        self.in_part = 0  # rows in the part being written

    def table(self, table: Any) -> None:
        """A table in prediction_schema (PredictionRows.table, prediction_table), written as row groups fill."""
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= min(self.group_rows, self.part_rows - self.in_part):
            self._write(final=False)

    def _write(self, final: bool) -> None:
        table = self.pa.concat_tables(self.pending) if self.pending else None
        self.pending, self.pending_rows = [], 0
        while table is not None and table.num_rows:
            room = self.part_rows - self.in_part
            if not final and table.num_rows < min(self.group_rows, room):
                self.pending, self.pending_rows = [table], table.num_rows
                return
            head, table = table.slice(0, room), table.slice(room)
            if not final and head.num_rows < room:  # keep the incomplete last group for later
                full = head.num_rows // self.group_rows * self.group_rows
                head, rest = head.slice(0, full), head.slice(full)
                self.pending, self.pending_rows = [rest], rest.num_rows
                table = None
            if self.writer is None:
                self.writer = self.pq.ParquetWriter(
                    Path(self.folder) / f"part-{self.parts:05d}{SHARD_SUFFIX}", self.schema
                )
                self.parts += 1
            self.writer.write_table(head, row_group_size=self.group_rows)
            self.in_part += head.num_rows
            if self.in_part >= self.part_rows:
                self.writer.close()
                self.writer, self.in_part = None, 0

    def close(self) -> None:
        """Write what is buffered and close the last part. A run without any input still writes one (empty)
        part, so that readers find the schema."""
        self._write(final=True)
        if self.writer is None and self.parts == 0:
            self.writer = self.pq.ParquetWriter(Path(self.folder) / f"part-00000{SHARD_SUFFIX}", self.schema)
            self.parts = 1
        if self.writer is not None:
            self.writer.close()
            self.writer = None
