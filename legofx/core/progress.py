"""Progress bars for long work (training in the demo, ``fold(strategy="auto")`` on a compiled
backend): ``tqdm`` when it is installed (the ``dev`` extra) and stderr is a terminal, else
the iterable as it is."""

from __future__ import annotations


def progress(iterable, description: str, unit: str, quiet: bool = False):
    if quiet:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, unit=unit, leave=True,
                dynamic_ncols=True, disable=None)
