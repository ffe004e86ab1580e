"""The root of the test suite.

tests/ holds helpers used across folders (``fakes``, ``formdata``,
``pgserver``); tests/integration holds ``support``. Test folders have no
``__init__.py``: pyproject.toml's ``[tool.pytest.ini_options] pythonpath``
makes the helpers importable by name, before any test module is collected.
"""
