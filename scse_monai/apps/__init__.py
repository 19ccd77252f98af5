"""What the MONAI Label and MONAI Deploy apps (top-level ``apps/monailabel`` and ``apps/deploy``) share: the
organ names and their DICOM codes (:mod:`scse_monai.apps.organs`). It imports neither framework.
"""
