"""Outputs appear whole or not at all, and nothing is overwritten without force."""
import os

import pytest

from powerinfer_py.atomic import atomic_dir, atomic_file
from powerinfer_py.errors import InputError


def test_interrupted_folder_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "half"), "w").close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out.bin"
    out.write_text("old")
    with pytest.raises(InputError, match="--force"):
        with atomic_file(str(out)):
            pass
    with atomic_file(str(out), force=True) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert out.read_text() == "new" and os.listdir(tmp_path) == ["out.bin"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_folder_replaced_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with atomic_dir(str(out), force=True) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(out) == ["new"] and os.listdir(tmp_path) == ["out"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
