"""Print the data source `make demo` uses: $CIFARKIT_DATA if set; else torchvision's CIFAR-10 when it is already
downloaded or its download can be reached; else, offline, the small real sample bundled with cifarkit, with one
line on stderr that says so and how to get the full data set.

    python scripts/demo_data.py          # prints e.g. "torchvision" or "sample"

This fallback is the demo's policy only: `cifar-train --data torchvision` on an offline machine still fails
with an error, so that a real run never trains on the sample without being asked to.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from cifarkit.data import SAMPLE_SOURCE, default_data_dir

# torchvision.datasets.CIFAR10.url (hard-coded so this check need not import torch; tests compare the two).
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
PROBE_TIMEOUT_S = 15.0  # a HEAD request normally answers in well under a second; a black-holed network never


def torchvision_cached() -> bool:
    """The extracted download that `load_data("torchvision")` reads is already in the cache folder."""
    root = default_data_dir() / "torchvision"
    return any((folder / "data_batch_1").is_file() for folder in (root, root / "cifar-10-batches-py"))


def download_problem(url: str = CIFAR10_URL, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if `url` answers a HEAD request (through the proxies the environment names, as torchvision's
    download would), else why not, in a few words."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "cifarkit-demo"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} from {url}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url} unreachable: {reason}"


def sample_counts() -> tuple[int, int]:
    """(train, test) images in the bundled sample, counted in its archive (no extraction)."""
    import tarfile
    from importlib.resources import as_file, files

    from cifarkit.data import SAMPLE_ARCHIVE

    with as_file(files("cifarkit") / "sample" / SAMPLE_ARCHIVE) as path, tarfile.open(path) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    return sum(n.startswith("train/") for n in names), sum(n.startswith("test/") for n in names)


def resolve() -> str:
    env = os.environ.get("CIFARKIT_DATA")
    if env:
        return env
    if torchvision_cached():
        return "torchvision"
    problem = download_problem()
    if problem is None:
        return "torchvision"
    train, test = sample_counts()
    print(
        f"demo: cannot download CIFAR-10 ({problem}); falling back to the bundled sample of {train + test:,} real "
        f"CIFAR-10 images ({train:,} train, {test:,} test). For the full data set, run with network access or set "
        "CIFARKIT_DATA to an extracted copy (README, Data).",
        file=sys.stderr,
    )
    return SAMPLE_SOURCE


if __name__ == "__main__":
    print(resolve())
