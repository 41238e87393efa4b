"""Passerelle's protocols and service: DIMSE, DICOMweb, KOS publication, command line."""
