"""Output formats of cifar-infer, written row by row as predictions come: table, csv, json, jsonl, and
parquet (a dataset folder of part files, cifarkit.shards.PredictionParts, that also holds the failed inputs).

Names from data (paths, class names) are escaped by one reversible rule (cifarkit.escape): table and csv
carry escape_name's text, json and jsonl JSON strings; no format can be broken by a name, and none passes a
control character to a terminal.

write = Writer(f, "csv", labels, top_k)
write.start(); write.row(prediction); ...; write.end()
"""

from __future__ import annotations

import csv
from typing import IO, Any

from cifarkit.escape import escape_name, json_line
from cifarkit.infer import Failure, Prediction

FORMATS = ("table", "csv", "json", "jsonl", "parquet")


class Writer:
    """table: aligned columns, path last (rows stream out before the longest path is known, while the label
    width is known from the model's class names); csv: path,label,index,probability then label_2,
    probability_2, ... for top-k > 1; jsonl: one object a line; json: one array of those objects."""

    def __init__(self, f: IO[str] | Any, fmt: str, labels: tuple[str, ...], top_k: int) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
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
        if self.fmt == "parquet":  # f is a cifarkit.shards.PredictionParts
            self.f.prediction(p)
        elif self.fmt == "table":
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

    def failure(self, failure: Failure) -> None:
        """An input that failed: a row with its error in parquet; the text formats name it on stderr only."""
        if self.fmt == "parquet":
            self.f.failure(failure)

    def end(self) -> None:
        if self.fmt == "parquet":
            self.f.close()
        elif self.fmt == "json":
            self.f.write("\n]\n")
