#!/usr/bin/env bash
# The prepared GPU check (scripts/device_check.py): trains the blog and airbench recipes on CUDA, exports and
# verifies both, compares the artifacts with the CUDA-trained eager model, measures TorchScript inference on
# the GPU at batch 4096 and, while its time budget lasts, torch.compile against eager training. It writes one
# JSON of figures, device-check.json, to $OUT (or --out; default runs/device-check), rewritten after every
# phase. cifarkit is not installed for it: it runs from src/ with whatever python3 has torch.
#
# 1. Once, in the checkout's root on the development machine: put the two JPEG archives (~19 MB) in the
#    folder it reads, which git ignores through .git/info/exclude:
#
#      mkdir -p .device-data && cp ../shared/data/cifar10-jpeg/train.tar.gz ../shared/data/cifar10-jpeg/test.tar.gz .device-data/
#      grep -qxF '/.device-data/' .git/info/exclude || echo '/.device-data/' >> .git/info/exclude
#
# 2. On the GPU machine, through the device tool: one call,
#
#      run(command="bash scripts/device-check.sh", carry=[".device-data"], timeout_s=420)
#
#    The script keeps itself within --budget (default 330 s, counted from its start: it skips the optional
#    torch.compile and onnxruntime phases, saying so in the JSON, when they would not fit, and a compile that
#    runs long is killed at the budget), so 420 s leaves margin and, on a warm machine, device time for a
#    second try. The essential phases (data, both trainings, exports, parity, inference) are expected to take
#    2-3 minutes on one H200 (an estimate: nothing has run there yet). device-check.json comes back under the
#    reply's files_at, and is rewritten after every phase, so a run cut short still returns what it measured;
#    the reply's output_tail has one line per phase.
#
# 3. Here, as a check that nothing rotted (the test suite runs this): the same phases on tiny synthetic data,
#
#      scripts/device-check.sh --device cpu --quick --out /tmp/device-check
#
# Python: $PYTHON if set, else this checkout's .venv if there is one, else python3 (the GPU machine's, with
# torch 2.11 and CUDA 13). Exit status: 0 every essential phase passed, 1 one failed (see the JSON), 2 bad
# usage (the archives are missing, or --device cuda without CUDA), with one line saying what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$py" scripts/device_check.py "$@"
