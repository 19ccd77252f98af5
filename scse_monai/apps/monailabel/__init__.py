"""MONAI Label server app for the scse_monai bundle (the app folder is this package's folder).

Start it with ``make label-server STUDIES=DIR PORT=N`` or
``.venv-label/bin/python -m monailabel.main start_server --app scse_monai/apps/monailabel --studies DIR
--host 127.0.0.1 --port N``. MONAI Label loads ``main.py`` from this folder; ``lib/`` holds the tasks.
"""
