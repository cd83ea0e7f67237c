"""Output formats of cifar-infer, written row by row as predictions come: table, csv, json, jsonl.

write = Writer(f, "csv", labels, top_k)
write.start(); write.row(prediction); ...; write.end()
"""

from __future__ import annotations

import csv
import json
from typing import IO, Any

from cifarkit.infer import Prediction

FORMATS = ("table", "csv", "json", "jsonl")


class Writer:
    """table: aligned columns, path last (rows stream out before the longest path is known, while the label
    width is known from the model's class names); csv: path,label,index,probability then label_2,
    probability_2, ... for top-k > 1; jsonl: one object a line; json: one array of those objects."""

    def __init__(self, f: IO[str] | Any, fmt: str, labels: tuple[str, ...], top_k: int) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.f, self.fmt, self.k = f, fmt, top_k
        self.width = max(5, *(len(label) for label in labels))
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
        if self.fmt == "table":
            cells = [f"{label:<{self.width}} {100 * prob:5.1f}%" for label, prob in p.top_k]
            self.f.write("  ".join(cells) + f"  {p.source}\n")
        elif self.fmt == "csv":
            extra = [v for label, prob in p.top_k[1:] for v in (label, f"{prob:.6f}")]
            self.csv.writerow([p.source, p.label, p.index, f"{p.probability:.6f}", *extra])
        else:
            text = json.dumps(p.to_dict(), ensure_ascii=False)
            if self.fmt == "json":
                text = ("\n" if self.rows == 0 else ",\n") + text
            self.f.write(text + ("\n" if self.fmt == "jsonl" else ""))
        self.rows += 1

    def end(self) -> None:
        if self.fmt == "json":
            self.f.write("\n]\n")
