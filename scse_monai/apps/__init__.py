"""Clinical front ends for the scse_monai bundle: a MONAI Label server app and a MONAI Deploy application.

Each runs in its own environment (``make label-setup`` builds ``.venv-label``, ``make deploy-setup`` builds
``.venv-deploy``) because MONAI Label 0.8.5 and MONAI Deploy App SDK 4.0.0 pin incompatible pydicom / numpy
versions. This package itself imports neither framework; only the sub-packages do.
"""
