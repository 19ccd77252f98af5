"""The MONAI Deploy App SDK application graph for the scse_monai bundle.

DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (CHAOS-like MR T2-SPIR, then CT) ->
DICOMSeriesToVolumeOperator (its affine corrected for non-square pixels) ->
MonaiBundleInferenceOperator (``model.ts`` exported with its configs) -> DICOMSegmentationWriterOperator (one
segment per organ, SNOMED CT coded), as in the SDK's spleen example.
Run it through ``python apps/deploy`` (see ``__main__.py``), which checks the inputs first and
moves the SEG into the output folder only once it is complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.core.domain import Image
from monai.deploy.core.io_type import IOType
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from pydicom.sr.coding import Code
from rules import SERIES_RULES

from scse_monai import __version__
from scse_monai.apps.organs import ORGAN_CODES, SNOMED_ANATOMICAL_STRUCTURE, organ_labels, read_torchscript_metadata

__all__ = [
    "SERIES_RULES",
    "AnonymisedSourceSegWriterOperator",
    "NoMatchingSeriesError",
    "OrganSegApp",
    "RequiredSeriesSelectorOperator",
    "SpacingCorrectVolumeOperator",
    "segment_descriptions",
]


class NoMatchingSeriesError(ValueError):
    """No series in the input matches :data:`SERIES_RULES`."""


class RequiredSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """The SDK's series selector, but an input with no matching series is an error instead of a silent no-op.

    The stock operator emits an empty list and the graph then ends without output and without an error.
    """

    def filter(self, selection_rules, dicom_study_list, all_matched=False, sort_by_sop_instance_count=False):
        selected = super().filter(selection_rules, dicom_study_list, all_matched, sort_by_sop_instance_count)
        if not selected:
            names = [s["name"] for s in (selection_rules or {}).get("selections", [])]
            raise NoMatchingSeriesError(f"no DICOM series in the input matches the selection rules {names}")
        return selected


class SpacingCorrectVolumeOperator(DICOMSeriesToVolumeOperator):
    """The SDK's series-to-volume operator with each in-plane spacing on its own axis of the affine.

    SDK 4.0.0 scales the row direction (the column index) by PixelSpacing[0], the spacing between rows, and the
    column direction by PixelSpacing[1]; DICOM defines the opposite, so non-square pixels were stretched.
    """

    def compute_affine_transform(self, s_1, s_n, n, series):
        super().compute_affine_transform(s_1, s_n, n, series)
        between_rows, between_columns = (float(v) for v in s_1[0x0028, 0x0030].value)  # PixelSpacing, checked > 0
        for name in (self.ATTRIBUTE_DICOM_AFFINE, self.ATTRIBUTE_NIFTI_AFFINE):
            affine = getattr(series, name)
            affine[:3, 0] *= between_columns / between_rows
            affine[:3, 1] *= between_rows / between_columns


# Type 2 Patient / General Study attributes that highdicom copies from the source images into the SEG. They may
# be empty but must be present; CHAOS headers (and many anonymised series) drop them.
_TYPE2_SOURCE_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


class AnonymisedSourceSegWriterOperator(DICOMSegmentationWriterOperator):
    """The SDK's SEG writer, tolerant of source images whose anonymisation removed Type 2 attributes.

    Missing attributes are added empty to the in-memory source datasets only (files on disk are not touched),
    which is what DICOM allows for Type 2; without them highdicom raises ``AttributeError``.
    """

    def create_dicom_seg(self, image, dicom_series, output_dir):
        for instance in dicom_series.get_sop_instances():
            dataset = instance.get_native_sop_instance()
            for keyword in _TYPE2_SOURCE_ATTRIBUTES:
                if keyword not in dataset:
                    setattr(dataset, keyword, "")
        return super().create_dicom_seg(image, dicom_series, output_dir)


def segment_descriptions(labels: dict[int, str], algorithm_version: str) -> list[SegmentDescription]:
    """One SDK ``SegmentDescription`` per organ, numbered like the bundle's label values.

    Args:
        labels: label value -> organ name, contiguous from 1 (from :func:`organ_labels`).
        algorithm_version: bundle version, written as the SEG's algorithm version.

    Raises:
        ValueError: the label values are not 1..N (the SEG writer numbers segments by position).
    """
    if sorted(labels) != list(range(1, len(labels) + 1)):
        raise ValueError(f"organ label values must be 1..N for DICOM SEG segment numbers, got {sorted(labels)}")
    category = Code(*SNOMED_ANATOMICAL_STRUCTURE)
    return [
        SegmentDescription(
            segment_label=ORGAN_CODES[name][2],
            segmented_property_category=category,
            segmented_property_type=Code(*ORGAN_CODES[name]),
            algorithm_name="scse_monai SE-UNet (scSE) abdominal organ segmentation",
            algorithm_version=algorithm_version,
        )
        for _, name in sorted(labels.items())
    ]


class OrganSegApp(Application):
    """DICOM series -> bundle inference -> DICOM SEG with liver, right kidney, left kidney and spleen.

    The organ list and algorithm version come from the ``metadata.json`` embedded in the model file.

    Example:
        >>> OrganSegApp(["app", "-i", "dicom_dir", "-o", "out", "-m", "bundle/models/model.ts"]).run()  # doctest: +SKIP
    """

    #: Selection rules of the series selector; ``__main__`` narrows them to the one series it checked.
    series_rules: dict = SERIES_RULES

    def compose(self):
        app_context: AppContext = Application.init_app_context(self.argv)
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            # one warning per non-DICOM file (CHAOS keeps its PNG masks beside the series) is noise, not news
            logging.getLogger(DICOMDataLoaderOperator.__module__).setLevel(logging.ERROR)
        input_path = Path(app_context.input_path)
        output_path = Path(app_context.output_path)
        metadata = read_torchscript_metadata(app_context.model_path)
        labels = organ_labels(metadata)
        version = str(metadata.get("version", __version__))
        logging.info(f"Segmenting {list(labels.values())} with bundle version {version}")

        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="study_loader")
        selector = RequiredSeriesSelectorOperator(self, rules=json.dumps(self.series_rules), name="series_selector")
        to_volume = SpacingCorrectVolumeOperator(self, name="series_to_volume")
        inference = MonaiBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            name="bundle_inference",
        )
        writer = AnonymisedSourceSegWriterOperator(
            self,
            segment_descriptions=segment_descriptions(labels, version),
            custom_tags={"SeriesDescription": "scse_monai organ segmentation (research use only)"},
            output_folder=output_path,
            name="seg_writer",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, inference, {("image", "image")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, writer, {("pred", "seg_image")})
