"""DICOMweb resources (PS3.18): WADO-RS, metadata, frames and bulk data, rendered and
thumbnail, QIDO-RS, STOW-RS, and WADO-URI."""
