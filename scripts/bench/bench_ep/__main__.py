"""``python scripts/bench/bench_ep`` (from any directory) or ``python -m scripts.bench.bench_ep`` (from the
repository root): see the package docstring."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
# ``python scripts/bench/bench_ep`` puts this folder first on sys.path, where its module names (model,
# memory, ...) could shadow top-level ones: import the package from the repository root instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench.bench_ep.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
