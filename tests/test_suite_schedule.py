"""The order in which scripts/test.sh hands test files to its workers (tests/conftest.py)."""

import os

from tests import conftest

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_every_costly_file_exists():
  # A renamed file would silently fall back to xdist's order, and the suite's wall time with it.
  missing = [f for f in conftest.COSTLIEST_FIRST if not os.path.isfile(os.path.join(TESTS, f))]
  assert not missing, f"tests/conftest.py COSTLIEST_FIRST names files that do not exist: {missing}"
  assert len(set(conftest.COSTLIEST_FIRST)) == len(conftest.COSTLIEST_FIRST)


def test_costly_files_first_in_their_order_then_the_most_tests():
  counts = {"tests/test_a.py": 3, "tests/test_b.py": 40, "tests/test_c.py": 40,
            "tests/test_smollm2.py": 6, "tests/test_export_smollm2.py": 24}
  key = conftest._schedule_key(counts)
  assert sorted(counts, key=key) == ["tests/test_export_smollm2.py", "tests/test_smollm2.py", "tests/test_b.py",
                                     "tests/test_c.py", "tests/test_a.py"]
