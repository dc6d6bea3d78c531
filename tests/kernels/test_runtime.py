"""The runtime helpers every kernel family shares (sloth_core/kernels/_runtime.py)."""
from sloth_core.kernels._runtime import compiled_launcher, interpreting


def test_interpreting_follows_the_environment(monkeypatch):
    """Read on every call (tests switch the interpreter per test), through os.environ's encoded store."""
    for value, expected in (("1", True), ("0", False), ("", False), ("11", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreting() is expected
    monkeypatch.delenv("TRITON_INTERPRET")
    assert interpreting() is False


def test_no_compiled_launcher_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert compiled_launcher(object(), (1,)) is None
