"""maskq's command lines, at the top beside the web app (neither imports the other).

- ``main.py``: the ``maskq`` command (the console script in ``pyproject.toml``): API keys
  (``KeyStore``, and the development key of ``stores/dev_key.py``), ``segment`` (a folder through
  the HTTP API: ``maskq/folder_run.py``), ``redis`` (the embedded Redis of ``make run``);
- ``procfile.py``: ``make run`` itself, the Procfile under honcho (``python -m cli.procfile``).
"""
