import pytest


@pytest.fixture(scope="module")
def tokenizer(task):
    """The built-in task's tokenizer (the `task` fixture lives in tests/conftest.py)."""
    return task.load_tokenizer()
