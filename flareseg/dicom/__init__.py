"""DICOM in, DICOM SEG out: a CT series read into the canonical :class:`~flareseg.volume.Volume` layout,
label maps written back as a DICOM Segmentation that references the series.

- :mod:`flareseg.dicom.files`: which files and folders hold DICOM, and what a series folder is called.
- :mod:`flareseg.dicom.series`: reading one series (checks, slice order, geometry, parallel decoding).
- :mod:`flareseg.dicom.seg`: writing and reading DICOM SEG with highdicom (imported only when used).
"""

from flareseg.dicom.files import (
    count_dicom_files,
    dicom_files,
    find_series,
    holds_image_series,
    is_dicom_file,
    is_series_dir,
    series_case_name,
)
from flareseg.dicom.seg import check_seg_writable, read_seg, write_seg
from flareseg.dicom.series import DicomSeries, read_series

__all__ = [
    "DicomSeries",
    "check_seg_writable",
    "count_dicom_files",
    "dicom_files",
    "find_series",
    "holds_image_series",
    "is_dicom_file",
    "is_series_dir",
    "read_seg",
    "read_series",
    "series_case_name",
    "write_seg",
]
