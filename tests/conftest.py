import os

import pytest

from prepare import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def root():
    return ROOT


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    src = d / "text.txt"
    src.write_text(open(os.path.join(os.path.dirname(__file__), "..", "data", "shakespeare_tiny.txt"),
                        encoding="utf-8").read()[:20000], encoding="utf-8")
    prepare(str(src), str(d / "prep"), seq_len=16)
    return str(d / "prep")
