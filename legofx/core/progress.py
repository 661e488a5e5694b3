"""Progress for long work (training in the demo, its phases, ``fold(strategy="auto")`` on a
compiled backend): a ``tqdm`` bar when stderr is a terminal and ``tqdm`` is installed (the
``dev`` extra); otherwise one plain, flushed line on stderr as each step starts, so that a
piped or redirected log is never silent for minutes."""

from __future__ import annotations

import sys
import time


def progress(iterable, description: str, unit: str, quiet: bool = False):
    """``iterable``, reporting each step; a step that is a string is named in the report."""
    if quiet:
        return iterable
    stream = sys.stderr
    if stream is not None and stream.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return _bar(tqdm(iterable, desc=description, unit=unit, leave=True, dynamic_ncols=True))
    return _lines(iterable, description, unit)


def _bar(bar):
    with bar:
        for item in bar:
            if isinstance(item, str):
                bar.set_postfix_str(item)
            yield item


def _lines(iterable, description: str, unit: str):
    try:
        total = f"/{len(iterable)}"
    except TypeError:
        total = ""
    start = time.perf_counter()
    for count, item in enumerate(iterable, 1):
        step = f"{item} ({count}{total})" if isinstance(item, str) else f"{unit} {count}{total}"
        print(f"{description}: {step}, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        yield item
