"""Shared fixtures: the real ReLU model from ../shared (materialised once per machine into a cache folder),
and automatic skipping of GPU tests where there is no CUDA."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared"))
SHARED_MODEL = os.path.join(SHARED, "models", "relu-smollm2-135m")
CACHE = os.environ.get("POWERINFER_TEST_CACHE", os.path.join(ROOT, ".cache"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_path(*parts):
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (../shared is only on the project's machines)")
    return path


@pytest.fixture(scope="session")
def relu_smollm2_dir():
    """The real relu-smollm2-135m as a Hugging Face checkpoint (fp16), materialised once into .cache/ (or
    $POWERINFER_TEST_CACHE, where the device's copy is put)."""
    dest = os.path.join(CACHE, "relu-smollm2-135m")
    if not os.path.exists(os.path.join(dest, "model.safetensors")):
        shared_path("models", "relu-smollm2-135m", "materialize.py")
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run([sys.executable, os.path.join(SHARED_MODEL, "materialize.py"), dest], check=True,
                       stdout=subprocess.DEVNULL)
    return dest


@pytest.fixture(scope="session")
def wiki_dev_path():
    return shared_path("data", "wiki-dev.txt")


@pytest.fixture(scope="session")
def calib_path():
    return shared_path("data", "calib.txt")
