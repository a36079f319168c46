"""The suite's own guards: a missing dev package skips a local run but fails under CI."""

import pytest

from conftest import dev_import

MISSING = "scalelab_no_such_package"


def test_dev_import_returns_the_module():
    assert dev_import("json").dumps([1]) == "[1]"


def test_missing_dev_package_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        dev_import(MISSING)


def test_missing_dev_package_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING} .*does not import under CI"):
        dev_import(MISSING)
