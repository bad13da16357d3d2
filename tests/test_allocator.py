"""The training process keeps freed memory (glibc thresholds raised; fgvc/engine/allocator.py)."""

import platform
import subprocess
import sys

import pytest

from fgvc.engine import allocator


def test_skipped_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_accepts_both_thresholds():
    # in a child process, so this test process keeps glibc's defaults
    code = "from fgvc.engine.allocator import keep_freed_memory; print(keep_freed_memory())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_training_entry_point_sets_it(monkeypatch):
    import fgvc.train as entry

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr("fgvc.engine.trainer.train", lambda cfg: None)
    assert entry.main(["recipe=synth_baseline", "output_dir=/nonexistent-never-written", "train.epochs=1"]) == 0
    assert calls == [1]
