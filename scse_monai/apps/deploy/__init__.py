"""MONAI Deploy application: one DICOM series in, a DICOM SEG of the abdominal organs out.

Run it with ``python -m scse_monai.apps.deploy -i DICOM_DIR -o OUT_DIR -m model.ts``. It needs the MONAI Deploy
App SDK environment (``make deploy-setup``); importing this package alone does not.
"""
