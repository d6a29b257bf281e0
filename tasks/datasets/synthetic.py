"""Synthetic sources: ``synthetic://GENERATOR?param=value&...`` URLs.

A pipeline's generator is a config dataclass (its fields are the URL's parameters, numbers
only) and a class that generates deterministic data of the real data's schema from it; see
the example pipelines' ``synthetic`` modules.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any

READER_VERSION = "1"
ROWS_PER_BLOCK = 65_536


def synthetic_generator(url: str) -> str | None:
    """The generator a ``synthetic://`` URL names, or ``None`` for any other URL."""
    if not isinstance(url, str) or not url.startswith("synthetic://"):
        return None
    parsed = urllib.parse.urlparse(url)
    return parsed.netloc or parsed.path.lstrip("/")


def parse_synthetic_url(url: str, config_cls: type) -> Any:
    """``synthetic://NAME?num_rows=1000`` → ``config_cls(num_rows=1000)``.

    Raises:
        ValueError: an unknown parameter, or one that is not a number.
    """
    parsed = urllib.parse.urlparse(url)
    fields = {f.name: f.type for f in dataclasses.fields(config_cls)}
    params: dict[str, Any] = {}
    for key, values in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items():
        if key not in fields:
            raise ValueError(f"source_url {url!r}: unknown parameter {key!r} (known: {', '.join(fields)})")
        raw = values[-1]
        try:
            params[key] = float(raw) if fields[key] == "float" else int(raw)
        except ValueError:
            raise ValueError(f"source_url {url!r}: parameter {key}={raw!r} is not a number") from None
    return config_cls(**params)


def check_generator(url: str, expected: str) -> None:
    """Refuse a ``synthetic://`` URL whose generator is not ``expected`` (the pipeline's own).

    Raises:
        ValueError: another pipeline's generator, or one nobody has.
    """
    from trainflow.tasks.pipelines import pipeline_names

    generator = synthetic_generator(url)
    if generator == expected:
        return
    if generator in pipeline_names():
        raise ValueError(f"source_url {url!r} generates {generator} data, this pipeline needs {expected}")
    raise ValueError(f"source_url {url!r}: unknown synthetic generator {generator!r} (this pipeline's: {expected})")
