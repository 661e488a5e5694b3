"""The merge kernel's cache: a library another user could have written, or a damaged one, is
never loaded (docs/security.md); builds are locked; an unusable kernel drops out of "auto"."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import legofx
from legofx.methods.lego import kernel as merge_kernel
from legofx.methods.lego.kernel import loader

EVIL = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE* f = fopen(getenv("LEGOFX_TEST_MARKER"), "w"); if (f) { fputs("ran", f); fclose(f); }
}
int lego_merge_f32(void) { return 0; }
int lego_merge_f64(void) { return 0; }
int lego_merge_vectorized(void) { return 99; }
"""


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader that has loaded nothing yet, warned about nothing, with a marker file path
    that planted code would write."""
    monkeypatch.setattr(loader, "_libraries", {})
    monkeypatch.setattr(loader, "_private", None)
    monkeypatch.setattr(loader, "_warned", False)
    marker = tmp_path / "planted-code-ran"
    monkeypatch.setenv("LEGOFX_TEST_MARKER", str(marker))
    return marker


def planted_library(tmp_path: Path) -> bytes:
    source = tmp_path / "evil.c"
    source.write_text(EVIL)
    subprocess.run([loader.find_compiler(), "-shared", "-fPIC", "-o", str(tmp_path / "evil.so"),
                    str(source)], check=True)
    return (tmp_path / "evil.so").read_bytes()


def assert_kernel_works(marker: Path) -> None:
    assert loader.library().lego_merge_vectorized() != 99
    x, lego, coef = torch.randn(1, 4, 5, 5), torch.randn(3, 2, 1, 1), torch.randn(4, 2)
    index = torch.tensor([0, 3, 1, 4, 2, 5, 0, 3])
    out = torch.ops.legofx.lego_conv_merge.default(x, lego, index, coef, None, [1, 1], [0, 0],
                                                   [1, 1], False)
    expected = merge_kernel.reference_conv_merge(x, lego, index, coef, None, [1, 1], [0, 0],
                                                 [1, 1], False)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)  # float32 rounding
    assert not marker.exists()


def test_cache_is_private_whatever_the_umask(tmp_path, monkeypatch, fresh_loader):
    monkeypatch.setenv("LEGOFX_CACHE_DIR", str(tmp_path / "made" / "cache"))
    old = os.umask(0)
    try:
        built = loader.build()
    finally:
        os.umask(old)
    assert built.parent == tmp_path / "made" / "cache"
    assert stat.S_IMODE(built.parent.stat().st_mode) == 0o700
    for path in built.parent.iterdir():
        if path.suffix in (".so", ".sha256"):
            assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path


def test_a_library_planted_in_a_shared_cache_never_runs(tmp_path, monkeypatch, fresh_loader):
    monkeypatch.setenv("LEGOFX_CACHE_DIR", str(tmp_path / "mine"))
    name = loader.build().name  # the predictable name
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    data = planted_library(tmp_path)
    (shared / name).write_bytes(data)
    (shared / name).with_suffix(".sha256").write_text(loader._digest(data))  # even "verified"
    monkeypatch.setenv("LEGOFX_CACHE_DIR", str(shared))
    with pytest.warns(RuntimeWarning, match=r"not using the kernel cache.*writable by group or others"):
        assert loader.cache_dir() != shared
    assert_kernel_works(fresh_loader)
    assert loader.build().parent == loader._private


@pytest.mark.parametrize("damage", ["replaced", "truncated", "empty"])
def test_a_damaged_or_replaced_library_is_rebuilt_not_loaded(damage, tmp_path, monkeypatch,
                                                            fresh_loader):
    monkeypatch.setenv("LEGOFX_CACHE_DIR", str(tmp_path / "cache"))
    built = loader.build()
    good = built.read_bytes()
    bad = {"replaced": planted_library(tmp_path), "truncated": good[:len(good) // 2],
           "empty": b""}[damage]
    built.write_bytes(bad)
    assert_kernel_works(fresh_loader)
    assert loader._verified(built) and built.read_bytes() != bad


def test_a_library_without_the_kernel_symbols_is_unavailable(tmp_path, monkeypatch, fresh_loader):
    source = tmp_path / "empty.c"
    source.write_text("int nothing_here = 1;\n")
    monkeypatch.setattr(loader, "SOURCE", source)
    monkeypatch.setenv("LEGOFX_CACHE_DIR", str(tmp_path / "cache"))
    reason = merge_kernel.available()
    assert reason is not None and "cannot be used" in reason and "lego_merge_" in reason


def test_an_unwritable_cache_builds_privately_with_one_warning(monkeypatch, fresh_loader):
    monkeypatch.setenv("LEGOFX_CACHE_DIR", "/proc/legofx-cannot-exist")
    with pytest.warns(RuntimeWarning, match="cannot be created"):
        assert merge_kernel.available() is None
    assert_kernel_works(fresh_loader)


@pytest.mark.parametrize("cause", ["compiler fails", "unknown LEGOFX_KERNEL"])
def test_auto_drops_fused_with_the_reason_whatever_the_cause(cause, monkeypatch, fresh_loader):
    if cause == "compiler fails":
        monkeypatch.setenv("CC", "false")
    else:
        monkeypatch.setenv("LEGOFX_KERNEL", "sse9")
    gm = legofx.transform(nn.Sequential(nn.Conv2d(4, 8, 3)), o=2, m=2).eval()
    with pytest.raises(merge_kernel.KernelUnavailable, match="strategy='fused'"):
        legofx.fold(gm, "fused")
    folded = legofx.fold(gm, "auto", example_inputs=torch.randn(1, 4, 6, 6), custom_ops=True)
    lowering = legofx.summary(folded)[0].lowering
    expected = "did not compile" if cause == "compiler fails" else "LEGOFX_KERNEL must be one of"
    assert "fused dropped" in lowering and expected in lowering, lowering


def test_concurrent_processes_compile_once(tmp_path):
    log = tmp_path / "compiler.log"
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(f"#!/bin/sh\necho run >> {log}\nsleep 1\nexec {loader.find_compiler()} \"$@\"\n")
    wrapper.chmod(0o700)
    env = {**os.environ, "CC": str(wrapper), "LEGOFX_CACHE_DIR": str(tmp_path / "cache"),
           "LEGOFX_KERNEL": "portable", "PYTHONPATH": os.pathsep.join(sys.path)}
    script = textwrap.dedent("""
        from legofx.methods.lego.kernel import loader
        print(loader.build())
    """)
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                             text=True) for _ in range(3)]
    paths = {run.communicate(timeout=120)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert len(paths) == 1 and log.read_text().count("run") == 1
