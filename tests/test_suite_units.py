"""The suite's own scheduling (tests/conftest.py): every work unit names real test files, each once,
and the scheduler puts a unit's files in one scope and any other file in a scope of its own."""

from collections import Counter
from pathlib import Path

from conftest import WORK_UNITS, work_unit

TESTS = Path(__file__).resolve().parent


def test_work_units_name_existing_files_once():
    names = [name for unit in WORK_UNITS for name in unit]
    assert [name for name, n in Counter(names).items() if n > 1] == []
    assert [name for name in names if not (TESTS / name).is_file()] == []


def test_a_units_files_share_one_scope():
    first, second = WORK_UNITS[0][:2]
    assert work_unit(f"tests/{first}::test_a") == work_unit(f"tests/{second}::test_b[x]")
    assert work_unit("tests/test_files.py::test_a") == "test_files.py"
    assert work_unit("tests/test_files.py::test_a") != work_unit(f"tests/{first}::test_a")
