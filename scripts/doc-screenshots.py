"""Copy the UI screenshots of the browser tests into docs/images/, made small (256-colour PNG).

Run after ``bash scripts/test.sh tests/integration/test_browser.py``:

    .venv/bin/python scripts/doc-screenshots.py [artifacts folder, default test-artifacts/]
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ("airflow-trigger-form", "airflow-run", "airflow-run-triggered-from-the-form", "mlflow-model-version")


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "test-artifacts"
    target = ROOT / "docs" / "images"
    target.mkdir(parents=True, exist_ok=True)
    for name in SHOTS:
        path = source / f"{name}.png"
        if not path.exists():
            sys.exit(f"{path} missing: run the browser tests first")
        image = Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        out = target / f"{name}.png"
        image.save(out, optimize=True)
        print(f"{out.relative_to(ROOT)}: {out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
