"""MONAI Deploy application: DICOM series in, DICOM SEG of the abdominal organs out (``python -m scse_monai.apps.deploy``).

Needs the MONAI Deploy App SDK environment (``make deploy-setup``); importing this package alone does not.
"""
